//! String ops: `StringConcat`, `StringNormalizer`, `StringSplit`, `RegexFullMatch`.

use std::any::Any;

use kiln_core::fact::{broadcast_dims, broadcast_shapes};
use kiln_core::{BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("StringConcat", |_| Ok(Box::new(StringConcat)));
    reg.register("StringNormalizer", build_string_normalizer);
    reg.register("StringSplit", build_string_split);
    reg.register("RegexFullMatch", build_regex_full_match);
}

/// The `i`-th input as a string tensor.
fn string_input<'a>(inputs: &[Option<&'a Value>], i: usize, op: &str) -> Result<&'a Tensor> {
    let t = kiln_core::input_tensor(inputs, i, op)?;
    if t.dtype() != DType::String {
        return Err(KilnError::kernel(
            op,
            format!("input {i} must be a string tensor, found {}", t.dtype()),
        ));
    }
    Ok(t)
}

/// Strides of `shape` broadcast to `out` (0 along broadcast axes), aligned to `out`'s rank.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = kiln_core::strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < pad || shape[i - pad] == 1 {
                0
            } else {
                s[i - pad]
            }
        })
        .collect()
}

/// `StringConcat`: element-wise concatenation with broadcasting.
#[derive(Debug)]
pub struct StringConcat;

impl Op for StringConcat {
    fn op_type(&self) -> &str {
        "StringConcat"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let shape = match (
            inputs.first().copied().flatten(),
            inputs.get(1).copied().flatten(),
        ) {
            (Some(a), Some(b)) => match (&a.shape, &b.shape) {
                (Some(x), Some(y)) => Some(broadcast_dims(x, y).ok_or_else(|| {
                    KilnError::Other(format!(
                        "cannot broadcast {} with {}",
                        a.describe(),
                        b.describe()
                    ))
                })?),
                _ => None,
            },
            _ => None,
        };
        Ok(vec![Fact {
            shape,
            ..Fact::of_dtype(DType::String)
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "StringConcat";
        let a = string_input(inputs, 0, OP)?;
        let b = string_input(inputs, 1, OP)?;
        let out_shape = broadcast_shapes(a.shape(), b.shape()).ok_or_else(|| {
            KilnError::kernel(
                OP,
                format!("cannot broadcast {:?} with {:?}", a.shape(), b.shape()),
            )
        })?;
        let (sa, sb) = (
            broadcast_strides(a.shape(), &out_shape),
            broadcast_strides(b.shape(), &out_shape),
        );
        let (da, db) = (a.as_strings()?, b.as_strings()?);
        let n = kiln_core::numel(&out_shape);
        let mut idx = vec![0usize; out_shape.len()];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let oa: usize = idx.iter().zip(&sa).map(|(i, s)| i * s).sum();
            let ob: usize = idx.iter().zip(&sb).map(|(i, s)| i * s).sum();
            out.push(format!("{}{}", da[oa], db[ob]));
            for d in (0..out_shape.len()).rev() {
                idx[d] += 1;
                if idx[d] < out_shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(vec![Value::Tensor(Tensor::from_strings(&out_shape, out)?)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Case change applied by `StringNormalizer`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CaseChange {
    None,
    Lower,
    Upper,
}

/// `StringNormalizer`: drops stop words and changes case. Input `[C]` or `[1, C]`.
#[derive(Debug)]
pub struct StringNormalizer {
    case: CaseChange,
    case_sensitive: bool,
    stopwords: Vec<String>,
}

fn build_string_normalizer(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let case = match a.string("case_change_action", "NONE")?.as_str() {
        "NONE" => CaseChange::None,
        "LOWER" => CaseChange::Lower,
        "UPPER" => CaseChange::Upper,
        other => {
            return Err(a.invalid(format!(
                "case_change_action must be NONE, LOWER or UPPER, found {other:?}"
            )))
        }
    };
    let case_sensitive = a.int("is_case_sensitive", 0)? != 0;
    let mut stopwords = a.opt_strings("stopwords")?.unwrap_or_default();
    if !case_sensitive {
        stopwords = stopwords.iter().map(|s| s.to_lowercase()).collect();
    }
    // `locale` only matters for case mapping; Rust's Unicode case mapping is used.
    let _ = a.opt_string("locale")?;
    Ok(Box::new(StringNormalizer {
        case,
        case_sensitive,
        stopwords,
    }))
}

impl StringNormalizer {
    fn is_stopword(&self, w: &str) -> bool {
        if self.case_sensitive {
            self.stopwords.iter().any(|s| s == w)
        } else {
            let lw = w.to_lowercase();
            self.stopwords.contains(&lw)
        }
    }

    fn change_case(&self, w: &str) -> String {
        match self.case {
            CaseChange::None => w.to_string(),
            CaseChange::Lower => w.to_lowercase(),
            CaseChange::Upper => w.to_uppercase(),
        }
    }
}

impl Op for StringNormalizer {
    fn op_type(&self) -> &str {
        "StringNormalizer"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let shape = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|f| f.shape.clone())
            .map(|mut s| {
                if self.stopwords.is_empty() {
                    s
                } else {
                    if let Some(last) = s.last_mut() {
                        *last = Dim::Unknown;
                    }
                    s
                }
            });
        Ok(vec![Fact {
            shape,
            ..Fact::of_dtype(DType::String)
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "StringNormalizer";
        let x = string_input(inputs, 0, OP)?;
        let words = x.as_strings()?;
        match x.shape() {
            [_] => {}
            [1, _] => {}
            [_, _] if self.stopwords.is_empty() => {
                let out: Vec<String> = words.iter().map(|w| self.change_case(w)).collect();
                return Ok(vec![Value::Tensor(Tensor::from_strings(x.shape(), out)?)]);
            }
            s => {
                return Err(KilnError::kernel(
                    OP,
                    format!("input must have shape [C] or [1, C], found {s:?}"),
                ))
            }
        }
        let mut out: Vec<String> = words
            .iter()
            .filter(|w| !self.is_stopword(w))
            .map(|w| self.change_case(w))
            .collect();
        if out.is_empty() {
            out.push(String::new());
        }
        let shape = if x.rank() == 1 {
            vec![out.len()]
        } else {
            vec![1, out.len()]
        };
        Ok(vec![Value::Tensor(Tensor::from_strings(&shape, out)?)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `StringSplit`: splits each string by a delimiter (whitespace runs when empty).
#[derive(Debug)]
pub struct StringSplit {
    delimiter: Option<String>,
    maxsplit: Option<usize>,
}

fn build_string_split(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let delimiter = a.opt_string("delimiter")?.filter(|d| !d.is_empty());
    let maxsplit = match a.opt_int("maxsplit")? {
        None => None,
        Some(m) if m < 0 => None,
        Some(m) => {
            Some(usize::try_from(m).map_err(|_| a.invalid(format!("maxsplit {m} is too large")))?)
        }
    };
    Ok(Box::new(StringSplit {
        delimiter,
        maxsplit,
    }))
}

/// Python's `str.split(None, maxsplit)`: whitespace runs separate, ends are stripped.
fn split_whitespace(s: &str, maxsplit: Option<usize>) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if maxsplit.is_some_and(|m| parts.len() == m) {
            parts.push(rest.to_string());
            break;
        }
        match rest.find(char::is_whitespace) {
            Some(end) => {
                parts.push(rest[..end].to_string());
                rest = rest[end..].trim_start();
            }
            None => {
                parts.push(rest.to_string());
                break;
            }
        }
    }
    parts
}

/// Python's `str.split(sep, maxsplit)`.
fn split_delim(s: &str, sep: &str, maxsplit: Option<usize>) -> Vec<String> {
    match maxsplit {
        Some(m) => s.splitn(m + 1, sep).map(str::to_string).collect(),
        None => s.split(sep).map(str::to_string).collect(),
    }
}

impl Op for StringSplit {
    fn op_type(&self) -> &str {
        "StringSplit"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let shape = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|f| f.shape.clone());
        let y_shape = shape.clone().map(|mut s| {
            s.push(Dim::Unknown);
            s
        });
        Ok(vec![
            Fact {
                shape: y_shape,
                ..Fact::of_dtype(DType::String)
            },
            Fact {
                shape,
                ..Fact::of_dtype(DType::I64)
            },
        ])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = string_input(inputs, 0, "StringSplit")?;
        let parts: Vec<Vec<String>> = x
            .as_strings()?
            .iter()
            .map(|s| match &self.delimiter {
                None => split_whitespace(s, self.maxsplit),
                Some(d) => split_delim(s, d, self.maxsplit),
            })
            .collect();
        let width = parts.iter().map(Vec::len).max().unwrap_or(0);
        let counts: Vec<i64> = parts.iter().map(|p| p.len() as i64).collect();
        let mut flat = Vec::with_capacity(parts.len() * width);
        for mut p in parts {
            p.resize(width, String::new());
            flat.extend(p);
        }
        let mut y_shape = x.shape().to_vec();
        y_shape.push(width);
        Ok(vec![
            Value::Tensor(Tensor::from_strings(&y_shape, flat)?),
            Value::Tensor(Tensor::from_vec(x.shape(), counts)?),
        ])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `RegexFullMatch`: whether each string matches a (RE2-syntax) pattern entirely.
#[derive(Debug)]
pub struct RegexFullMatch {
    re: regex::Regex,
}

fn build_regex_full_match(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let pattern = a
        .opt_string("pattern")?
        .ok_or_else(|| a.invalid("required attribute pattern is missing"))?;
    let re = regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| a.invalid(format!("invalid regular expression {pattern:?}: {e}")))?;
    Ok(Box::new(RegexFullMatch { re }))
}

impl Op for RegexFullMatch {
    fn op_type(&self) -> &str {
        "RegexFullMatch"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let shape = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|f| f.shape.clone());
        Ok(vec![Fact {
            shape,
            ..Fact::of_dtype(DType::Bool)
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = string_input(inputs, 0, "RegexFullMatch")?;
        let m: Vec<bool> = x
            .as_strings()?
            .iter()
            .map(|s| self.re.is_match(s))
            .collect();
        Ok(vec![Value::Tensor(Tensor::from_bools(x.shape(), &m)?)])
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

    fn st(shape: &[usize], v: &[&str]) -> Tensor {
        Tensor::from_strings(shape, v.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_tensor().unwrap().as_strings().unwrap().to_vec()
    }

    #[test]
    fn concat_broadcasts() {
        let a = st(&[2, 1], &["a", "b"]);
        let b = st(&[3], &["x", "y", "ü"]);
        let out = run(&StringConcat, &[tv(a.clone()), tv(b)]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[2, 3]);
        assert_eq!(strings(&out[0]), vec!["ax", "ay", "aü", "bx", "by", "bü"]);
        let s = st(&[], &["!"]);
        let out = run(&StringConcat, &[tv(s.clone()), tv(s)]).unwrap();
        assert_eq!(strings(&out[0]), vec!["!!"]);
        assert!(run(
            &StringConcat,
            &[tv(a.clone()), tv(st(&[1, 3], &["", "", ""]))]
        )
        .is_ok());
        assert!(run(
            &StringConcat,
            &[tv(a.clone()), tv(st(&[2, 2, 3], &[""; 12]))]
        )
        .is_ok());
        assert!(run(
            &StringConcat,
            &[tv(st(&[2], &["", ""])), tv(st(&[3], &["", "", ""]))]
        )
        .is_err());
        assert!(run(&StringConcat, &[tv(a), tv(Tensor::scalar(1.0f32))]).is_err());
    }

    fn normalizer(case: &str, sensitive: i64, stops: &[&str]) -> Box<dyn Op> {
        build(
            build_string_normalizer,
            "StringNormalizer",
            10,
            vec![
                ("case_change_action", Attr::String(case.into())),
                ("is_case_sensitive", Attr::Int(sensitive)),
                (
                    "stopwords",
                    Attr::Strings(stops.iter().map(|s| s.to_string()).collect()),
                ),
            ],
            1,
            1,
        )
        .unwrap()
    }

    #[test]
    fn normalizer_stopwords_and_case() {
        let x = st(&[4], &["monday", "tuesday", "Monday", "thursday"]);
        let out = run(
            normalizer("UPPER", 1, &["monday"]).as_ref(),
            &[tv(x.clone())],
        )
        .unwrap();
        assert_eq!(strings(&out[0]), vec!["TUESDAY", "MONDAY", "THURSDAY"]);
        let out = run(
            normalizer("LOWER", 0, &["MONDAY"]).as_ref(),
            &[tv(x.clone())],
        )
        .unwrap();
        assert_eq!(strings(&out[0]), vec!["tuesday", "thursday"]);
        let one = st(&[1, 2], &["monday", "monday"]);
        let out = run(normalizer("NONE", 1, &["monday"]).as_ref(), &[tv(one)]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[1, 1]);
        assert_eq!(strings(&out[0]), vec![""]);
        let two = st(&[2, 1], &["a", "b"]);
        assert!(run(normalizer("NONE", 1, &["a"]).as_ref(), &[tv(two.clone())]).is_err());
        assert_eq!(
            strings(&run(normalizer("UPPER", 1, &[]).as_ref(), &[tv(two)]).unwrap()[0]),
            vec!["A", "B"]
        );
        assert!(build(
            build_string_normalizer,
            "StringNormalizer",
            10,
            vec![("case_change_action", Attr::String("TITLE".into()))],
            1,
            1
        )
        .is_err());
    }

    fn splitter(delim: Option<&str>, maxsplit: Option<i64>) -> Box<dyn Op> {
        let mut attrs = vec![];
        if let Some(d) = delim {
            attrs.push(("delimiter", Attr::String(d.into())));
        }
        if let Some(m) = maxsplit {
            attrs.push(("maxsplit", Attr::Int(m)));
        }
        build(build_string_split, "StringSplit", 20, attrs, 1, 2).unwrap()
    }

    #[test]
    fn split_variants() {
        let x = st(&[2], &["  hello  world ", "a"]);
        let out = run(splitter(None, None).as_ref(), &[tv(x.clone())]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[2, 2]);
        assert_eq!(strings(&out[0]), vec!["hello", "world", "a", ""]);
        assert_eq!(
            out[1].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![2, 1]
        );
        let x = st(&[1], &["1,,2,3"]);
        let out = run(splitter(Some(","), None).as_ref(), &[tv(x.clone())]).unwrap();
        assert_eq!(strings(&out[0]), vec!["1", "", "2", "3"]);
        let out = run(splitter(Some(","), Some(1)).as_ref(), &[tv(x)]).unwrap();
        assert_eq!(strings(&out[0]), vec!["1", ",2,3"]);
        let x = st(&[1], &[" a  b c "]);
        let out = run(splitter(Some(""), Some(1)).as_ref(), &[tv(x)]).unwrap();
        assert_eq!(strings(&out[0]), vec!["a", "b c "]);
        let empty = st(&[0], &[]);
        let out = run(splitter(None, None).as_ref(), &[tv(empty)]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[0, 0]);
        let out = run(splitter(None, None).as_ref(), &[tv(st(&[1], &[""]))]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[1, 0]);
        assert_eq!(out[1].as_tensor().unwrap().to_i64_vec().unwrap(), vec![0]);
    }

    #[test]
    fn regex_full_match() {
        let op = build(
            build_regex_full_match,
            "RegexFullMatch",
            20,
            vec![("pattern", Attr::String(r"[a-z]+@(gmail|yahoo)\.com".into()))],
            1,
            1,
        )
        .unwrap();
        let x = st(&[3], &["ab@gmail.com", "ab@gmail.comx", "x@yahoo.com"]);
        let out = run(op.as_ref(), &[tv(x)]).unwrap();
        assert_eq!(
            out[0].as_tensor().unwrap().as_bools().unwrap(),
            &[true, false, true]
        );
        // Alternation must not escape the anchors.
        let op = build(
            build_regex_full_match,
            "RegexFullMatch",
            20,
            vec![("pattern", Attr::String("a|b".into()))],
            1,
            1,
        )
        .unwrap();
        let out = run(op.as_ref(), &[tv(st(&[2], &["ab", "b"]))]).unwrap();
        assert_eq!(
            out[0].as_tensor().unwrap().as_bools().unwrap(),
            &[false, true]
        );
        assert!(build(
            build_regex_full_match,
            "RegexFullMatch",
            20,
            vec![("pattern", Attr::String("(".into()))],
            1,
            1
        )
        .is_err());
    }
}
