//! Classic-ML ops of the `ai.onnx.ml` domain: `ArrayFeatureExtractor`, `Binarizer`,
//! `LabelEncoder` (opsets 1, 2 and 4), `TreeEnsemble` (opset 5), `Normalizer`, `Scaler`,
//! `OneHotEncoder`, `Imputer`. The optimizers of `ai.onnx.preview.training` live in
//! [`training`].

pub mod training;

use std::any::Any;
use std::collections::HashMap;

use kiln_core::{BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value};

use super::control_flow::util::gather_flat;

/// The `ai.onnx.ml` domain name.
const ML: &str = "ai.onnx.ml";

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register_in(ML, "ArrayFeatureExtractor", |_| {
        Ok(Box::new(ArrayFeatureExtractor))
    });
    reg.register_in(ML, "Binarizer", build_binarizer);
    reg.register_in(ML, "LabelEncoder", build_label_encoder);
    reg.register_in(ML, "TreeEnsemble", build_tree_ensemble);
    reg.register_in(ML, "Normalizer", build_normalizer);
    reg.register_in(ML, "Scaler", build_scaler);
    reg.register_in(ML, "OneHotEncoder", build_one_hot_encoder);
    reg.register_in(ML, "Imputer", build_imputer);
    training::register(reg);
}

/// A fact with the input's shape and a given dtype (or the input's dtype).
fn same_shape(inputs: &[Option<&Fact>], dtype: Option<DType>) -> Fact {
    let x = inputs.first().copied().flatten();
    Fact {
        dtype: dtype.or(x.and_then(|f| f.dtype)),
        shape: x.and_then(|f| f.shape.clone()),
        ..Fact::unknown()
    }
}

/// A numeric (non-string, non-bool) input.
fn numeric_input<'a>(inputs: &[Option<&'a Value>], i: usize, op: &str) -> Result<&'a Tensor> {
    let t = kiln_core::input_tensor(inputs, i, op)?;
    if t.dtype() == DType::String || t.dtype() == DType::Bool {
        return Err(KilnError::kernel(
            op,
            format!("input {i} must be numeric, found {}", t.dtype()),
        ));
    }
    Ok(t)
}

/// `[N, C]` view of a 1-D or 2-D input.
fn rows_cols(op: &str, t: &Tensor) -> Result<(usize, usize)> {
    match *t.shape() {
        [c] => Ok((1, c)),
        [n, c] => Ok((n, c)),
        _ => Err(KilnError::kernel(
            op,
            format!("input must be 1-D or 2-D, found shape {:?}", t.shape()),
        )),
    }
}

// ---------------------------------------------------------------- ArrayFeatureExtractor

/// `ArrayFeatureExtractor`: selects entries of the last axis (`X[..., Y]`).
#[derive(Debug)]
pub struct ArrayFeatureExtractor;

impl Op for ArrayFeatureExtractor {
    fn op_type(&self) -> &str {
        "ArrayFeatureExtractor"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let y = inputs.get(1).copied().flatten();
        let count = y
            .and_then(|f| f.concrete_shape())
            .map_or(Dim::Unknown, |s| Dim::Known(s.iter().product()));
        let shape = x.and_then(|f| f.shape.clone()).map(|mut s| {
            if s.len() <= 1 {
                vec![Dim::Known(1), count]
            } else {
                let last = s.len() - 1;
                s[last] = count;
                s
            }
        });
        Ok(vec![Fact {
            dtype: x.and_then(|f| f.dtype),
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "ArrayFeatureExtractor";
        let x = kiln_core::input_tensor(inputs, 0, OP)?;
        let y = kiln_core::input_tensor(inputs, 1, OP)?;
        let idx = y
            .to_i64_vec()
            .map_err(|e| KilnError::kernel(OP, format!("indices: {e}")))?;
        let c = *x
            .shape()
            .last()
            .ok_or_else(|| KilnError::kernel(OP, "X must have at least one dim"))?;
        let idx: Vec<usize> = idx
            .iter()
            .map(|&i| {
                usize::try_from(i).ok().filter(|i| *i < c).ok_or_else(|| {
                    KilnError::kernel(OP, format!("index {i} is out of range for {c} features"))
                })
            })
            .collect::<Result<_>>()?;
        let rows = x.len() / c.max(1);
        let flat: Vec<usize> = (0..rows)
            .flat_map(|r| idx.iter().map(move |&i| r * c + i))
            .collect();
        let shape = if x.rank() == 1 {
            vec![1, idx.len()]
        } else {
            let mut s = x.shape().to_vec();
            let last = s.len() - 1;
            s[last] = idx.len();
            s
        };
        Ok(vec![Value::Tensor(gather_flat(OP, x, &flat, &shape)?)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- Binarizer

/// `Binarizer`: 1 where `x > threshold`, else 0 (same dtype).
#[derive(Debug)]
pub struct Binarizer {
    threshold: f64,
}

fn build_binarizer(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Binarizer {
        threshold: f64::from(ctx.attrs().float("threshold", 0.0)?),
    }))
}

impl Op for Binarizer {
    fn op_type(&self) -> &str {
        "Binarizer"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![same_shape(inputs, None)])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = numeric_input(inputs, 0, "Binarizer")?;
        let v: Vec<f64> = x
            .to_f64_vec()?
            .iter()
            .map(|&e| if e > self.threshold { 1.0 } else { 0.0 })
            .collect();
        Ok(vec![Value::Tensor(
            Tensor::from_vec(x.shape(), v)?.cast(x.dtype())?,
        )])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- LabelEncoder

/// A hashable key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Str(String),
    Int(i64),
    Float(u64),
}

/// Float keys compare by value: NaN equals NaN, -0 equals 0.
fn float_key(v: f64) -> Key {
    if v.is_nan() {
        Key::Float(f64::NAN.to_bits())
    } else if v == 0.0 {
        Key::Float(0f64.to_bits())
    } else {
        Key::Float(v.to_bits())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KeyKind {
    Str,
    Int,
    Float,
}

/// `LabelEncoder`: maps keys to values, unknown keys to a default.
#[derive(Debug)]
pub struct LabelEncoder {
    kind: KeyKind,
    map: HashMap<Key, usize>,
    /// Values followed by the default, 1-D.
    table: Tensor,
}

fn keys_of(t: &Tensor) -> Result<(KeyKind, Vec<Key>)> {
    if t.dtype() == DType::String {
        Ok((
            KeyKind::Str,
            t.as_strings()?.iter().cloned().map(Key::Str).collect(),
        ))
    } else if t.dtype().is_float() {
        Ok((
            KeyKind::Float,
            t.to_f64_vec()?.into_iter().map(float_key).collect(),
        ))
    } else {
        Ok((
            KeyKind::Int,
            t.to_i64_vec()?.into_iter().map(Key::Int).collect(),
        ))
    }
}

fn build_label_encoder(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    if ctx.opset() < 2 {
        return build_label_encoder_v1(ctx);
    }
    let strs = |v: Vec<String>| Tensor::from_strings(&[v.len()], v);
    let keys = if let Some(k) = a.opt_strings("keys_strings")? {
        strs(k)?
    } else if let Some(k) = a.opt_ints("keys_int64s")? {
        Tensor::from_vec(&[k.len()], k)?
    } else if let Some(k) = a.opt_floats("keys_floats")? {
        Tensor::from_vec(&[k.len()], k)?
    } else if let Some(k) = a.opt_tensor("keys_tensor")? {
        k
    } else {
        return Err(
            a.invalid("one of keys_strings, keys_int64s, keys_floats, keys_tensor is required")
        );
    };
    let (values, default) = if let Some(v) = a.opt_strings("values_strings")? {
        (
            strs(v)?,
            strs(vec![a.string("default_string", "_Unused")?])?,
        )
    } else if let Some(v) = a.opt_ints("values_int64s")? {
        (
            Tensor::from_vec(&[v.len()], v)?,
            Tensor::from_vec(&[1], vec![a.int("default_int64", -1)?])?,
        )
    } else if let Some(v) = a.opt_floats("values_floats")? {
        (
            Tensor::from_vec(&[v.len()], v)?,
            Tensor::from_vec(&[1], vec![a.float("default_float", -0.0)?])?,
        )
    } else if let Some(v) = a.opt_tensor("values_tensor")? {
        let d = match a.opt_tensor("default_tensor")? {
            Some(d) => d,
            None if v.dtype() == DType::String => strs(vec!["_Unused".into()])?,
            None if v.dtype().is_float() => {
                Tensor::from_vec(&[1], vec![-0.0f64])?.cast(v.dtype())?
            }
            None => Tensor::from_vec(&[1], vec![-1i64])?.cast(v.dtype())?,
        };
        (v, d)
    } else {
        return Err(a.invalid(
            "one of values_strings, values_int64s, values_floats, values_tensor is required",
        ));
    };
    if keys.len() != values.len() {
        return Err(a.invalid(format!("{} keys but {} values", keys.len(), values.len())));
    }
    if default.len() != 1 || default.dtype() != values.dtype() {
        return Err(a.invalid("the default value must be one element of the values' type"));
    }
    let (kind, keys) = keys_of(&keys)?;
    let mut map = HashMap::with_capacity(keys.len());
    for (i, k) in keys.into_iter().enumerate() {
        map.entry(k).or_insert(i);
    }
    let values = values.reshape(&[values.len()])?;
    let table =
        super::control_flow::util::concat("LabelEncoder", &[values, default.reshape(&[1])?], 0)
            .map_err(|e| a.invalid(e.to_string()))?;
    Ok(Box::new(LabelEncoder { kind, map, table }))
}

/// Opset 1: `classes_strings` maps strings to their index, or indices to strings.
fn build_label_encoder_v1(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let classes = a.opt_strings("classes_strings")?.unwrap_or_default();
    // Both directions are encoded as a table; the direction is chosen by the input dtype
    // at run time, so keep the classes and defaults in a small dedicated op.
    Ok(Box::new(LabelEncoderV1 {
        classes,
        default_int: a.int("default_int64", -1)?,
        default_string: a.string("default_string", "_Unused")?,
    }))
}

impl LabelEncoder {
    fn lookup_index(&self, x: &Tensor) -> Result<Vec<usize>> {
        const OP: &str = "LabelEncoder";
        let default = self.table.len() - 1;
        let keys: Vec<Key> = match self.kind {
            KeyKind::Str => x
                .as_strings()
                .map_err(|_| {
                    KilnError::kernel(OP, format!("keys are strings, input is {}", x.dtype()))
                })?
                .iter()
                .cloned()
                .map(Key::Str)
                .collect(),
            KeyKind::Int if x.dtype().is_int() => {
                x.to_i64_vec()?.into_iter().map(Key::Int).collect()
            }
            KeyKind::Float if x.dtype() != DType::String => {
                x.to_f64_vec()?.into_iter().map(float_key).collect()
            }
            _ => {
                return Err(KilnError::kernel(
                    OP,
                    format!("input dtype {} does not match the keys", x.dtype()),
                ))
            }
        };
        Ok(keys
            .iter()
            .map(|k| self.map.get(k).copied().unwrap_or(default))
            .collect())
    }
}

impl Op for LabelEncoder {
    fn op_type(&self) -> &str {
        "LabelEncoder"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![same_shape(inputs, Some(self.table.dtype()))])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "LabelEncoder")?;
        let idx = self.lookup_index(x)?;
        Ok(vec![Value::Tensor(gather_flat(
            "LabelEncoder",
            &self.table,
            &idx,
            x.shape(),
        )?)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `LabelEncoder` opset 1 (string ↔ int64 through `classes_strings`).
#[derive(Debug)]
pub struct LabelEncoderV1 {
    classes: Vec<String>,
    default_int: i64,
    default_string: String,
}

impl Op for LabelEncoderV1 {
    fn op_type(&self) -> &str {
        "LabelEncoder"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let out = match x.and_then(|f| f.dtype) {
            Some(DType::String) => Some(DType::I64),
            Some(_) => Some(DType::String),
            None => None,
        };
        Ok(vec![Fact {
            dtype: out,
            ..same_shape(inputs, None)
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "LabelEncoder")?;
        if x.dtype() == DType::String {
            let v: Vec<i64> = x
                .as_strings()?
                .iter()
                .map(|s| {
                    self.classes
                        .iter()
                        .position(|c| c == s)
                        .map_or(self.default_int, |p| p as i64)
                })
                .collect();
            return Ok(vec![Value::Tensor(Tensor::from_vec(x.shape(), v)?)]);
        }
        let idx = x
            .to_i64_vec()
            .map_err(|e| KilnError::kernel("LabelEncoder", e.to_string()))?;
        let v: Vec<String> = idx
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.classes.get(i).cloned())
                    .unwrap_or_else(|| self.default_string.clone())
            })
            .collect();
        Ok(vec![Value::Tensor(Tensor::from_strings(x.shape(), v)?)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- TreeEnsemble

/// Comparison of an interior node.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Member,
}

/// Where a branch leads.
#[derive(Debug, Clone, Copy)]
enum Next {
    Node(usize),
    Leaf(usize),
}

#[derive(Debug, Clone)]
struct TreeNode {
    mode: Mode,
    split: f64,
    feature: usize,
    missing_true: bool,
    members: Vec<f64>,
    on_true: Next,
    on_false: Next,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Aggregate {
    Average,
    Sum,
    Min,
    Max,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PostTransform {
    None,
    Softmax,
    Logistic,
    SoftmaxZero,
    Probit,
}

/// `TreeEnsemble` (ai.onnx.ml opset 5): sums (or averages, min, max) leaf weights of
/// every tree per target.
#[derive(Debug)]
pub struct TreeEnsemble {
    nodes: Vec<TreeNode>,
    roots: Vec<Next>,
    leaf_targets: Vec<usize>,
    leaf_weights: Vec<f64>,
    n_targets: usize,
    aggregate: Aggregate,
    post: PostTransform,
}

fn build_tree_ensemble(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let req_tensor = |name: &str| {
        a.opt_tensor(name)?
            .ok_or_else(|| a.invalid(format!("required attribute {name} is missing")))
    };
    let idx = |v: i64, what: &str| {
        usize::try_from(v).map_err(|_| a.invalid(format!("{what} {v} is negative")))
    };
    let splits = req_tensor("nodes_splits")?.to_f64_vec()?;
    let modes = req_tensor("nodes_modes")?.to_i64_vec()?;
    let features = a.ints("nodes_featureids")?;
    let true_ids = a.ints("nodes_truenodeids")?;
    let false_ids = a.ints("nodes_falsenodeids")?;
    let true_leafs = a.ints("nodes_trueleafs")?;
    let false_leafs = a.ints("nodes_falseleafs")?;
    let n = modes.len();
    for (name, len) in [
        ("nodes_splits", splits.len()),
        ("nodes_featureids", features.len()),
        ("nodes_truenodeids", true_ids.len()),
        ("nodes_falsenodeids", false_ids.len()),
        ("nodes_trueleafs", true_leafs.len()),
        ("nodes_falseleafs", false_leafs.len()),
    ] {
        if len != n {
            return Err(a.invalid(format!("{name} has {len} entries, nodes_modes has {n}")));
        }
    }
    let missing = a.ints("nodes_missing_value_tracks_true")?;
    let leaf_targets: Vec<usize> = a
        .ints("leaf_targetids")?
        .iter()
        .map(|&t| idx(t, "leaf target id"))
        .collect::<Result<_>>()?;
    let leaf_weights = req_tensor("leaf_weights")?.to_f64_vec()?;
    if leaf_targets.len() != leaf_weights.len() {
        return Err(a.invalid("leaf_targetids and leaf_weights differ in length"));
    }
    let n_targets = idx(a.req_int("n_targets")?, "n_targets")?;
    if let Some(t) = leaf_targets.iter().find(|t| **t >= n_targets) {
        return Err(a.invalid(format!(
            "leaf target id {t} is out of range for {n_targets} targets"
        )));
    }
    // Membership sets, NaN-delimited, in the order MEMBER nodes appear in nodes_modes.
    let members_flat = a
        .opt_tensor("membership_values")?
        .map(|t| t.to_f64_vec())
        .transpose()?
        .unwrap_or_default();
    let mut sets: Vec<Vec<f64>> = members_flat
        .split(|v| v.is_nan())
        .map(<[f64]>::to_vec)
        .collect();
    if sets.last().is_some_and(Vec::is_empty) {
        sets.pop();
    }
    let n_member = modes.iter().filter(|m| **m == 6).count();
    if sets.len() != n_member {
        return Err(a.invalid(format!(
            "membership_values holds {} sets for {n_member} BRANCH_MEMBER nodes",
            sets.len()
        )));
    }
    let mut member_sets = sets.into_iter();
    let n_leaves = leaf_weights.len();
    let next = |id: i64, leaf: i64| -> Result<Next> {
        let i = idx(id, "branch id")?;
        if leaf != 0 {
            if i >= n_leaves {
                return Err(a.invalid(format!("leaf id {i} is out of range for {n_leaves} leaves")));
            }
            Ok(Next::Leaf(i))
        } else {
            if i >= n {
                return Err(a.invalid(format!("node id {i} is out of range for {n} nodes")));
            }
            Ok(Next::Node(i))
        }
    };
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let mode = match modes[i] {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            6 => Mode::Member,
            m => return Err(a.invalid(format!("unknown node mode {m}"))),
        };
        let members = if mode == Mode::Member {
            member_sets.next().ok_or_else(|| {
                a.invalid("membership_values lacks a set for a BRANCH_MEMBER node")
            })?
        } else {
            Vec::new()
        };
        nodes.push(TreeNode {
            mode,
            split: splits[i],
            feature: idx(features[i], "feature id")?,
            missing_true: missing.get(i).is_some_and(|m| *m != 0),
            members,
            on_true: next(true_ids[i], true_leafs[i])?,
            on_false: next(false_ids[i], false_leafs[i])?,
        });
    }
    let roots = a
        .ints("tree_roots")?
        .iter()
        .map(|&r| {
            let r = idx(r, "tree root")?;
            let node = nodes
                .get(r)
                .ok_or_else(|| a.invalid(format!("tree root {r} is out of range")))?;
            // A single-leaf tree: both branches reference the same leaf.
            Ok(match (node.on_true, node.on_false) {
                (Next::Leaf(x), Next::Leaf(y)) if x == y => Next::Leaf(x),
                _ => Next::Node(r),
            })
        })
        .collect::<Result<_>>()?;
    let aggregate = match a.int("aggregate_function", 1)? {
        0 => Aggregate::Average,
        1 => Aggregate::Sum,
        2 => Aggregate::Min,
        3 => Aggregate::Max,
        v => return Err(a.invalid(format!("unknown aggregate_function {v}"))),
    };
    let post = match a.int("post_transform", 0)? {
        0 => PostTransform::None,
        1 => PostTransform::Softmax,
        2 => PostTransform::Logistic,
        3 => PostTransform::SoftmaxZero,
        4 => PostTransform::Probit,
        v => return Err(a.invalid(format!("unknown post_transform {v}"))),
    };
    Ok(Box::new(TreeEnsemble {
        nodes,
        roots,
        leaf_targets,
        leaf_weights,
        n_targets,
        aggregate,
        post,
    }))
}

impl TreeEnsemble {
    /// The leaf a tree leads `row` to.
    fn leaf(&self, root: Next, row: &[f64]) -> Result<usize> {
        let mut at = root;
        for _ in 0..=self.nodes.len() {
            match at {
                Next::Leaf(l) => return Ok(l),
                Next::Node(i) => {
                    let n = &self.nodes[i];
                    let x = *row.get(n.feature).ok_or_else(|| {
                        KilnError::kernel(
                            "TreeEnsemble",
                            format!(
                                "feature id {} is out of range for {} features",
                                n.feature,
                                row.len()
                            ),
                        )
                    })?;
                    let go_true = if x.is_nan() && n.missing_true {
                        true
                    } else {
                        match n.mode {
                            Mode::Leq => x <= n.split,
                            Mode::Lt => x < n.split,
                            Mode::Gte => x >= n.split,
                            Mode::Gt => x > n.split,
                            Mode::Eq => x == n.split,
                            Mode::Neq => x != n.split,
                            Mode::Member => n.members.contains(&x),
                        }
                    };
                    at = if go_true { n.on_true } else { n.on_false };
                }
            }
        }
        Err(KilnError::kernel("TreeEnsemble", "the tree has a cycle"))
    }

    fn post_transform(&self, row: &mut [f64]) {
        match self.post {
            PostTransform::None => {}
            PostTransform::Logistic => row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
            PostTransform::Softmax => softmax(row, false),
            PostTransform::SoftmaxZero => softmax(row, true),
            PostTransform::Probit => row
                .iter_mut()
                .for_each(|v| *v = std::f64::consts::SQRT_2 * erfinv(2.0 * *v - 1.0)),
        }
    }
}

/// Softmax in place; with `keep_zeros`, zero entries stay zero and are left out.
fn softmax(row: &mut [f64], keep_zeros: bool) {
    let max = row
        .iter()
        .filter(|v| !keep_zeros || **v != 0.0)
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        if keep_zeros && *v == 0.0 {
            continue;
        }
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

/// Inverse error function (Giles' single-precision approximation, refined by two Newton steps).
fn erfinv(x: f64) -> f64 {
    if x <= -1.0 {
        return f64::NEG_INFINITY;
    }
    if x >= 1.0 {
        return f64::INFINITY;
    }
    let w = -((1.0 - x) * (1.0 + x)).ln();
    let mut p;
    if w < 5.0 {
        let w = w - 2.5;
        p = 2.810_226_36e-08;
        for c in [
            3.432_739_39e-07,
            -3.523_387_7e-06,
            -4.391_506_54e-06,
            0.000_218_580_87,
            -0.001_253_725_03,
            -0.004_177_681_64,
            0.246_640_727,
            1.501_409_41,
        ] {
            p = c + p * w;
        }
    } else {
        let w = w.sqrt() - 3.0;
        p = -0.000_200_214_257;
        for c in [
            0.000_100_950_558,
            0.001_349_343_22,
            -0.003_673_428_44,
            0.005_739_507_73,
            -0.007_622_461_3,
            0.009_438_870_47,
            1.001_674_06,
            2.832_976_82,
        ] {
            p = c + p * w;
        }
    }
    let mut y = p * x;
    for _ in 0..2 {
        let err = erf(y) - x;
        y -= err / (2.0 / std::f64::consts::PI.sqrt() * (-y * y).exp());
    }
    y
}

/// Error function (Abramowitz–Stegun 7.1.26 is too coarse; this uses a series / continued
/// fraction split good to ~1e-12).
fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Maclaurin series.
        let mut term = ax;
        let mut sum = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
            if n > 200.0 {
                break;
            }
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // Continued fraction for erfc.
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

impl Op for TreeEnsemble {
    fn op_type(&self) -> &str {
        "TreeEnsemble"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let n = x
            .and_then(|f| f.shape.as_ref()?.first().cloned())
            .unwrap_or(Dim::Unknown);
        Ok(vec![Fact {
            dtype: x.and_then(|f| f.dtype),
            shape: Some(vec![n, Dim::Known(self.n_targets)]),
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "TreeEnsemble";
        let x = numeric_input(inputs, 0, OP)?;
        let (n, f) = rows_cols(OP, x)?;
        let data = x.to_f64_vec()?;
        let init = match self.aggregate {
            Aggregate::Sum | Aggregate::Average => 0.0,
            Aggregate::Min => f64::MAX,
            Aggregate::Max => f64::MIN,
        };
        let mut out = vec![init; n * self.n_targets];
        for r in 0..n {
            let row = &data[r * f..(r + 1) * f];
            let acc = &mut out[r * self.n_targets..(r + 1) * self.n_targets];
            for &root in &self.roots {
                let l = self.leaf(root, row)?;
                let (t, w) = (self.leaf_targets[l], self.leaf_weights[l]);
                match self.aggregate {
                    Aggregate::Sum => acc[t] += w,
                    Aggregate::Average => acc[t] += w / self.roots.len() as f64,
                    Aggregate::Min => acc[t] = acc[t].min(w),
                    Aggregate::Max => acc[t] = acc[t].max(w),
                }
            }
            self.post_transform(acc);
        }
        let dtype = if x.dtype().is_float() {
            x.dtype()
        } else {
            DType::F32
        };
        Ok(vec![Value::Tensor(
            Tensor::from_vec(&[n, self.n_targets], out)?.cast(dtype)?,
        )])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- Normalizer

#[derive(Debug, Clone, Copy, PartialEq)]
enum Norm {
    Max,
    L1,
    L2,
}

/// `Normalizer`: divides each row by its max-abs, L1 or L2 norm (output f32).
#[derive(Debug)]
pub struct Normalizer {
    norm: Norm,
}

fn build_normalizer(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let norm = match a.string("norm", "MAX")?.as_str() {
        "MAX" => Norm::Max,
        "L1" => Norm::L1,
        "L2" => Norm::L2,
        other => return Err(a.invalid(format!("norm must be MAX, L1 or L2, found {other:?}"))),
    };
    Ok(Box::new(Normalizer { norm }))
}

impl Op for Normalizer {
    fn op_type(&self) -> &str {
        "Normalizer"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![same_shape(inputs, Some(DType::F32))])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = numeric_input(inputs, 0, "Normalizer")?;
        let (_, c) = rows_cols("Normalizer", x)?;
        let mut v = x.to_f64_vec()?;
        for row in v.chunks_mut(c.max(1)) {
            let d = match self.norm {
                Norm::Max => row.iter().map(|e| e.abs()).fold(0.0, f64::max),
                Norm::L1 => row.iter().map(|e| e.abs()).sum(),
                Norm::L2 => row.iter().map(|e| e * e).sum::<f64>().sqrt(),
            }
            .max(1e-30);
            row.iter_mut().for_each(|e| *e /= d);
        }
        Ok(vec![Value::Tensor(
            Tensor::from_vec(x.shape(), v)?.cast(DType::F32)?,
        )])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- Scaler

/// `Scaler`: `(x - offset) * scale` per feature (output f32).
#[derive(Debug)]
pub struct Scaler {
    offset: Vec<f64>,
    scale: Vec<f64>,
}

fn build_scaler(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let f = |n: &str| -> Result<Vec<f64>> {
        Ok(a.opt_floats(n)?
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect())
    };
    Ok(Box::new(Scaler {
        offset: f("offset")?,
        scale: f("scale")?,
    }))
}

/// Per-feature parameter: one value for all, or one per feature (empty means `default`).
fn per_feature(op: &str, what: &str, v: &[f64], c: usize, default: f64) -> Result<Vec<f64>> {
    match v.len() {
        0 => Ok(vec![default; c]),
        1 => Ok(vec![v[0]; c]),
        n if n == c => Ok(v.to_vec()),
        n => Err(KilnError::kernel(
            op,
            format!("{what} has {n} values for {c} features"),
        )),
    }
}

impl Op for Scaler {
    fn op_type(&self) -> &str {
        "Scaler"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![same_shape(inputs, Some(DType::F32))])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = numeric_input(inputs, 0, "Scaler")?;
        let c = x.shape().last().copied().unwrap_or(1);
        let off = per_feature("Scaler", "offset", &self.offset, c, 0.0)?;
        let sc = per_feature("Scaler", "scale", &self.scale, c, 1.0)?;
        let v: Vec<f64> = x
            .to_f64_vec()?
            .iter()
            .enumerate()
            .map(|(i, e)| (e - off[i % c.max(1)]) * sc[i % c.max(1)])
            .collect();
        Ok(vec![Value::Tensor(
            Tensor::from_vec(x.shape(), v)?.cast(DType::F32)?,
        )])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- OneHotEncoder

/// `OneHotEncoder`: one-hot vectors over known categories (output f32, new last axis).
#[derive(Debug)]
pub struct OneHotEncoder {
    cats: HashMap<Key, usize>,
    n_cats: usize,
    strings: bool,
    zeros: bool,
}

fn build_one_hot_encoder(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let ints = a.opt_ints("cats_int64s")?.unwrap_or_default();
    let strs = a.opt_strings("cats_strings")?.unwrap_or_default();
    let (keys, strings): (Vec<Key>, bool) = if !ints.is_empty() {
        (ints.into_iter().map(Key::Int).collect(), false)
    } else if !strs.is_empty() {
        (strs.into_iter().map(Key::Str).collect(), true)
    } else {
        return Err(a.invalid("one of cats_int64s, cats_strings is required"));
    };
    let n_cats = keys.len();
    let mut cats = HashMap::new();
    for (i, k) in keys.into_iter().enumerate() {
        cats.entry(k).or_insert(i);
    }
    Ok(Box::new(OneHotEncoder {
        cats,
        n_cats,
        strings,
        zeros: a.int("zeros", 1)? != 0,
    }))
}

impl Op for OneHotEncoder {
    fn op_type(&self) -> &str {
        "OneHotEncoder"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let mut f = same_shape(inputs, Some(DType::F32));
        if let Some(s) = f.shape.as_mut() {
            s.push(Dim::Known(self.n_cats));
        }
        Ok(vec![f])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "OneHotEncoder";
        let x = kiln_core::input_tensor(inputs, 0, OP)?;
        let keys: Vec<Key> = if self.strings {
            x.as_strings()
                .map_err(|e| KilnError::kernel(OP, e.to_string()))?
                .iter()
                .cloned()
                .map(Key::Str)
                .collect()
        } else {
            // Float inputs are truncated to integers, as ONNX Runtime does.
            x.to_f64_vec()
                .map_err(|e| KilnError::kernel(OP, e.to_string()))?
                .iter()
                .map(|v| Key::Int(*v as i64))
                .collect()
        };
        let mut out = vec![0f32; keys.len() * self.n_cats];
        for (i, k) in keys.iter().enumerate() {
            match self.cats.get(k) {
                Some(&j) => out[i * self.n_cats + j] = 1.0,
                None if !self.zeros => {
                    return Err(KilnError::kernel(
                        OP,
                        format!("value {k:?} is not a known category (zeros=0)"),
                    ))
                }
                None => {}
            }
        }
        let mut shape = x.shape().to_vec();
        shape.push(self.n_cats);
        Ok(vec![Value::Tensor(Tensor::from_vec(&shape, out)?)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- Imputer

/// `Imputer`: replaces a sentinel value (or NaN) by per-feature imputed values.
#[derive(Debug)]
pub struct Imputer {
    values: Vec<f64>,
    replaced: f64,
}

fn build_imputer(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let floats = a.opt_floats("imputed_value_floats")?.unwrap_or_default();
    let ints = a.opt_ints("imputed_value_int64s")?.unwrap_or_default();
    let (values, replaced) = if !floats.is_empty() {
        (
            floats.into_iter().map(f64::from).collect(),
            f64::from(a.float("replaced_value_float", 0.0)?),
        )
    } else if !ints.is_empty() {
        (
            ints.into_iter().map(|v| v as f64).collect(),
            a.int("replaced_value_int64", 0)? as f64,
        )
    } else {
        return Err(a.invalid("one of imputed_value_floats, imputed_value_int64s is required"));
    };
    Ok(Box::new(Imputer { values, replaced }))
}

impl Op for Imputer {
    fn op_type(&self) -> &str {
        "Imputer"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![same_shape(inputs, None)])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = numeric_input(inputs, 0, "Imputer")?;
        let c = x.shape().last().copied().unwrap_or(1).max(1);
        let vals = per_feature("Imputer", "imputed values", &self.values, c, 0.0)?;
        let v: Vec<f64> = x
            .to_f64_vec()?
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                let hit = if self.replaced.is_nan() {
                    e.is_nan()
                } else {
                    e == self.replaced
                };
                if hit {
                    vals[i % c]
                } else {
                    e
                }
            })
            .collect();
        Ok(vec![Value::Tensor(
            Tensor::from_vec(x.shape(), v)?.cast(x.dtype())?,
        )])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::control_flow::testutil::*;
    use kiln_core::Attr;

    fn mk(op_type: &str, opset: i64, attrs: Vec<(&str, Attr)>) -> Result<std::sync::Arc<dyn Op>> {
        let mut reg = OpRegistry::new();
        register(&mut reg);
        let desc = kiln_core::OpDesc {
            domain: ML.into(),
            op_type: op_type.into(),
            opset,
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        reg.build(&BuildCtx {
            node: "t",
            desc: &desc,
            n_inputs: 1,
            n_outputs: 1,
        })
    }

    fn out(op: &dyn Op, inputs: &[Option<Value>]) -> Tensor {
        run(op, inputs).unwrap().remove(0).into_tensor().unwrap()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn array_feature_extractor() {
        let op = mk("ArrayFeatureExtractor", 1, vec![]).unwrap();
        let x = f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let y = Tensor::from_vec(&[2], vec![2i64, 0]).unwrap();
        let o = out(op.as_ref(), &[tv(x.clone()), tv(y.clone())]);
        assert_eq!(o.shape(), &[2, 2]);
        assert_eq!(o.to_f32_vec().unwrap(), vec![3., 1., 6., 4.]);
        let o = out(op.as_ref(), &[tv(f32t(&[3], &[7., 8., 9.])), tv(y)]);
        assert_eq!(o.shape(), &[1, 2]);
        assert!(run(
            op.as_ref(),
            &[tv(x), tv(Tensor::from_vec(&[1], vec![3i64]).unwrap())]
        )
        .is_err());
    }

    #[test]
    fn binarizer() {
        let op = mk("Binarizer", 1, vec![("threshold", Attr::Float(0.5))]).unwrap();
        let o = out(op.as_ref(), &[tv(f32t(&[3], &[0.2, 0.5, 0.7]))]);
        assert_eq!(o.to_f32_vec().unwrap(), vec![0., 0., 1.]);
        let o = out(
            op.as_ref(),
            &[tv(Tensor::from_vec(&[2], vec![0i64, 3]).unwrap())],
        );
        assert_eq!(o.dtype(), DType::I64);
        assert_eq!(o.to_i64_vec().unwrap(), vec![0, 1]);
    }

    #[test]
    fn label_encoder_variants() {
        let op = mk(
            "LabelEncoder",
            2,
            vec![
                ("keys_strings", Attr::Strings(strs(&["a", "b"]))),
                ("values_int64s", Attr::Ints(vec![10, 20])),
                ("default_int64", Attr::Int(-5)),
            ],
        )
        .unwrap();
        let x = Tensor::from_strings(&[3], strs(&["b", "z", "a"])).unwrap();
        assert_eq!(
            out(op.as_ref(), &[tv(x)]).to_i64_vec().unwrap(),
            vec![20, -5, 10]
        );
        let op = mk(
            "LabelEncoder",
            2,
            vec![
                ("keys_floats", Attr::Floats(vec![1.5, f32::NAN])),
                ("values_strings", Attr::Strings(strs(&["x", "nan"]))),
            ],
        )
        .unwrap();
        let o = out(op.as_ref(), &[tv(f32t(&[3], &[1.5, f32::NAN, 2.0]))]);
        assert_eq!(o.as_strings().unwrap(), &["x", "nan", "_Unused"]);
        let op = mk(
            "LabelEncoder",
            4,
            vec![
                (
                    "keys_tensor",
                    Attr::Tensor(Tensor::from_vec(&[2], vec![1i32, 2]).unwrap()),
                ),
                (
                    "values_tensor",
                    Attr::Tensor(Tensor::from_vec(&[2], vec![0.5f64, 1.5]).unwrap()),
                ),
                (
                    "default_tensor",
                    Attr::Tensor(Tensor::from_vec(&[1], vec![9.0f64]).unwrap()),
                ),
            ],
        )
        .unwrap();
        let o = out(
            op.as_ref(),
            &[tv(Tensor::from_vec(&[2, 2], vec![2i32, 1, 3, 2]).unwrap())],
        );
        assert_eq!(o.dtype(), DType::F64);
        assert_eq!(o.shape(), &[2, 2]);
        assert_eq!(o.to_f64_vec().unwrap(), vec![1.5, 0.5, 9.0, 1.5]);
        assert!(mk(
            "LabelEncoder",
            2,
            vec![("keys_int64s", Attr::Ints(vec![1]))]
        )
        .is_err());
        assert!(mk(
            "LabelEncoder",
            2,
            vec![
                ("keys_int64s", Attr::Ints(vec![1])),
                ("values_int64s", Attr::Ints(vec![1, 2]))
            ]
        )
        .is_err());
        let v1 = mk(
            "LabelEncoder",
            1,
            vec![("classes_strings", Attr::Strings(strs(&["x", "y"])))],
        )
        .unwrap();
        let o = out(
            v1.as_ref(),
            &[tv(Tensor::from_strings(&[2], strs(&["y", "q"])).unwrap())],
        );
        assert_eq!(o.to_i64_vec().unwrap(), vec![1, -1]);
        let o = out(
            v1.as_ref(),
            &[tv(Tensor::from_vec(&[2], vec![0i64, 7]).unwrap())],
        );
        assert_eq!(o.as_strings().unwrap(), &["x", "_Unused"]);
    }

    fn tree_attrs(aggregate: i64) -> Vec<(&'static str, Attr)> {
        // Tree 0: x0 <= 1 ? leaf0 (t0, 1.0) : (x1 in {2, 3} ? leaf1 (t1, 2.0) : leaf2 (t0, 3.0))
        // Tree 1: single leaf3 (t1, 10.0)
        vec![
            (
                "nodes_splits",
                Attr::Tensor(Tensor::from_vec(&[3], vec![1.0f32, 0.0, 0.0]).unwrap()),
            ),
            (
                "nodes_modes",
                Attr::Tensor(Tensor::from_vec(&[3], vec![0u8, 6, 0]).unwrap()),
            ),
            ("nodes_featureids", Attr::Ints(vec![0, 1, 0])),
            ("nodes_truenodeids", Attr::Ints(vec![0, 1, 3])),
            ("nodes_falsenodeids", Attr::Ints(vec![1, 2, 3])),
            ("nodes_trueleafs", Attr::Ints(vec![1, 1, 1])),
            ("nodes_falseleafs", Attr::Ints(vec![0, 1, 1])),
            ("nodes_missing_value_tracks_true", Attr::Ints(vec![1, 0, 0])),
            (
                "membership_values",
                Attr::Tensor(Tensor::from_vec(&[3], vec![2.0f32, 3.0, f32::NAN]).unwrap()),
            ),
            ("leaf_targetids", Attr::Ints(vec![0, 1, 0, 1])),
            (
                "leaf_weights",
                Attr::Tensor(Tensor::from_vec(&[4], vec![1.0f32, 2.0, 3.0, 10.0]).unwrap()),
            ),
            ("tree_roots", Attr::Ints(vec![0, 2])),
            ("n_targets", Attr::Int(2)),
            ("aggregate_function", Attr::Int(aggregate)),
        ]
    }

    #[test]
    fn tree_ensemble_paths_and_aggregates() {
        let op = mk("TreeEnsemble", 5, tree_attrs(1)).unwrap();
        let x = f32t(&[4, 2], &[0.5, 0.0, 2.0, 3.0, 2.0, 5.0, f32::NAN, 5.0]);
        let o = out(op.as_ref(), &[tv(x.clone())]);
        assert_eq!(o.shape(), &[4, 2]);
        assert_eq!(
            o.to_f32_vec().unwrap(),
            vec![1., 10., 0., 12., 3., 10., 1., 10.]
        );
        let op = mk("TreeEnsemble", 5, tree_attrs(0)).unwrap();
        let o = out(op.as_ref(), &[tv(x.clone())]);
        assert_eq!(
            o.to_f32_vec().unwrap(),
            vec![0.5, 5., 0., 6., 1.5, 5., 0.5, 5.]
        );
        let op = mk("TreeEnsemble", 5, tree_attrs(3)).unwrap();
        let o = out(
            op.as_ref(),
            &[tv(Tensor::from_vec(&[1, 2], vec![0.5f64, 0.0]).unwrap())],
        );
        assert_eq!(o.dtype(), DType::F64);
        assert_eq!(o.to_f64_vec().unwrap(), vec![1.0, 10.0]);
        // Too few features.
        assert!(run(op.as_ref(), &[tv(f32t(&[1, 1], &[5.0]))]).is_err());
        // Bad attributes.
        let mut bad = tree_attrs(1);
        bad[3] = ("nodes_truenodeids", Attr::Ints(vec![0, 1]));
        assert!(mk("TreeEnsemble", 5, bad).is_err());
        let mut bad = tree_attrs(1);
        bad[8] = (
            "membership_values",
            Attr::Tensor(Tensor::from_vec(&[0], Vec::<f32>::new()).unwrap()),
        );
        assert!(mk("TreeEnsemble", 5, bad).is_err());
    }

    #[test]
    fn erfinv_inverts_erf() {
        for &y in &[-2.0, -0.5, 0.0, 0.1, 1.3] {
            assert!((erfinv(erf(y)) - y).abs() < 1e-9, "{y}");
        }
    }

    #[test]
    fn normalizer_scaler_onehot_imputer() {
        let op = mk("Normalizer", 1, vec![("norm", Attr::String("L1".into()))]).unwrap();
        let o = out(op.as_ref(), &[tv(f32t(&[2, 2], &[1., -3., 0., 0.]))]);
        assert_eq!(o.to_f32_vec().unwrap(), vec![0.25, -0.75, 0., 0.]);
        let op = mk("Normalizer", 1, vec![("norm", Attr::String("L2".into()))]).unwrap();
        let o = out(op.as_ref(), &[tv(f32t(&[2], &[3., 4.]))]);
        assert_eq!(o.to_f32_vec().unwrap(), vec![0.6, 0.8]);
        let op = mk(
            "Scaler",
            1,
            vec![
                ("offset", Attr::Floats(vec![1.0, 2.0])),
                ("scale", Attr::Floats(vec![2.0])),
            ],
        )
        .unwrap();
        let o = out(op.as_ref(), &[tv(f32t(&[2, 2], &[1., 2., 3., 4.]))]);
        assert_eq!(o.to_f32_vec().unwrap(), vec![0., 0., 4., 4.]);
        assert!(run(op.as_ref(), &[tv(f32t(&[1, 3], &[1., 2., 3.]))]).is_err());
        let op = mk(
            "OneHotEncoder",
            1,
            vec![("cats_strings", Attr::Strings(strs(&["a", "b", "c"])))],
        )
        .unwrap();
        let o = out(
            op.as_ref(),
            &[tv(Tensor::from_strings(&[2], strs(&["c", "z"])).unwrap())],
        );
        assert_eq!(o.shape(), &[2, 3]);
        assert_eq!(o.to_f32_vec().unwrap(), vec![0., 0., 1., 0., 0., 0.]);
        let op = mk(
            "OneHotEncoder",
            1,
            vec![
                ("cats_int64s", Attr::Ints(vec![4, 2])),
                ("zeros", Attr::Int(0)),
            ],
        )
        .unwrap();
        assert!(run(
            op.as_ref(),
            &[tv(Tensor::from_vec(&[1], vec![3i64]).unwrap())]
        )
        .is_err());
        let op = mk(
            "Imputer",
            1,
            vec![
                ("imputed_value_floats", Attr::Floats(vec![7.0, 8.0])),
                ("replaced_value_float", Attr::Float(f32::NAN)),
            ],
        )
        .unwrap();
        let o = out(
            op.as_ref(),
            &[tv(f32t(&[2, 2], &[f32::NAN, 1., 2., f32::NAN]))],
        );
        assert_eq!(o.to_f32_vec().unwrap(), vec![7., 1., 2., 8.]);
    }
}
