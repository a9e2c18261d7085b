//! Einsum: general equations (explicit or implicit output, ellipsis with broadcasting,
//! repeated indices/diagonals, any number of operands) by a plain loop over the index
//! space, with exact wrapping arithmetic for integers.

use kiln_core::{input_tensor, BuildCtx, Dim, Fact, KilnError, Op, Result, Tensor, Value};

/// A label: a letter, or one dim of the ellipsis (counted from its left end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Label {
    Ellipsis(usize),
    Letter(char),
}

/// One operand term: letters with an optional ellipsis position.
#[derive(Debug, Clone)]
struct Term {
    letters: Vec<char>,
    /// Index in `letters` where the ellipsis sits.
    ellipsis: Option<usize>,
}

fn parse_term(s: &str) -> Result<Term> {
    let mut letters = Vec::new();
    let mut ellipsis = None;
    let mut rest = s.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("...") {
            if ellipsis.is_some() {
                return Err(KilnError::kernel(
                    "Einsum",
                    format!("term {s:?} has two ellipses"),
                ));
            }
            ellipsis = Some(letters.len());
            rest = r;
            continue;
        }
        let c = rest.chars().next().unwrap_or(' ');
        if !c.is_ascii_alphabetic() {
            if !c.is_whitespace() {
                return Err(KilnError::kernel(
                    "Einsum",
                    format!("invalid character {c:?} in term {s:?}"),
                ));
            }
        } else {
            letters.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    Ok(Term { letters, ellipsis })
}

/// ONNX Einsum.
#[derive(Debug, Clone)]
pub struct Einsum {
    inputs: Vec<Term>,
    output: Option<Term>,
}

/// Builds Einsum.
pub fn build_einsum(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let eq = a
        .opt_string("equation")?
        .ok_or_else(|| a.invalid("Einsum requires an equation"))?;
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let inputs = lhs
        .split(',')
        .map(parse_term)
        .collect::<Result<Vec<_>>>()
        .map_err(|e| a.invalid(e.to_string()))?;
    let output = rhs
        .map(parse_term)
        .transpose()
        .map_err(|e| a.invalid(e.to_string()))?;
    Ok(Box::new(Einsum { inputs, output }))
}

/// The resolved problem: each operand's labels per dim, the label sizes, output labels.
struct Resolved {
    labels: Vec<Label>,
    sizes: Vec<usize>,
    operand_labels: Vec<Vec<usize>>,
    out: Vec<usize>,
    out_shape: Vec<usize>,
}

impl Einsum {
    fn resolve(&self, shapes: &[Vec<usize>]) -> Result<Resolved> {
        let err = |m: String| KilnError::kernel("Einsum", m);
        if shapes.len() != self.inputs.len() {
            return Err(err(format!(
                "equation has {} operands, got {} inputs",
                self.inputs.len(),
                shapes.len()
            )));
        }
        let mut ell_rank = 0;
        for (t, s) in self.inputs.iter().zip(shapes) {
            if t.ellipsis.is_none() && s.len() != t.letters.len() || s.len() < t.letters.len() {
                return Err(err(format!(
                    "operand of shape {s:?} does not match term {:?}",
                    t.letters
                )));
            }
            if t.ellipsis.is_some() {
                ell_rank = ell_rank.max(s.len() - t.letters.len());
            }
        }
        let mut labels: Vec<Label> = (0..ell_rank).map(Label::Ellipsis).collect();
        let mut sizes: Vec<usize> = vec![1; ell_rank];
        let mut count: Vec<usize> = vec![0; ell_rank];
        let mut operand_labels = Vec::new();
        for (t, s) in self.inputs.iter().zip(shapes) {
            let mut per_dim = Vec::with_capacity(s.len());
            let e = s.len() - t.letters.len();
            for (li, &c) in t.letters.iter().enumerate() {
                if t.ellipsis == Some(li) {
                    for j in 0..e {
                        per_dim.push(Label::Ellipsis(ell_rank - e + j));
                    }
                }
                per_dim.push(Label::Letter(c));
            }
            if t.ellipsis == Some(t.letters.len()) {
                for j in 0..e {
                    per_dim.push(Label::Ellipsis(ell_rank - e + j));
                }
            }
            let mut ids = Vec::with_capacity(s.len());
            for (&l, &size) in per_dim.iter().zip(s) {
                let id = match labels.iter().position(|&x| x == l) {
                    Some(i) => i,
                    None => {
                        labels.push(l);
                        sizes.push(size);
                        count.push(0);
                        labels.len() - 1
                    }
                };
                count[id] += 1;
                if sizes[id] != size {
                    let broadcastable =
                        matches!(l, Label::Ellipsis(_)) && (sizes[id] == 1 || size == 1);
                    if !broadcastable {
                        return Err(err(format!(
                            "label {l:?} has sizes {} and {size}",
                            sizes[id]
                        )));
                    }
                    sizes[id] = sizes[id].max(size);
                }
                ids.push(id);
            }
            operand_labels.push(ids);
        }
        let out: Vec<usize> = match &self.output {
            Some(t) => {
                let mut o = Vec::new();
                let push_ell = |o: &mut Vec<usize>| (0..ell_rank).for_each(|i| o.push(i));
                for (li, c) in t.letters.iter().enumerate() {
                    if t.ellipsis == Some(li) {
                        push_ell(&mut o);
                    }
                    let id = labels
                        .iter()
                        .position(|&x| x == Label::Letter(*c))
                        .ok_or_else(|| err(format!("output label {c} is not in any input")))?;
                    if o.contains(&id) {
                        return Err(err(format!("output label {c} repeats")));
                    }
                    o.push(id);
                }
                if t.ellipsis == Some(t.letters.len()) {
                    push_ell(&mut o);
                }
                o
            }
            None => {
                let mut o: Vec<usize> = (0..ell_rank).collect();
                let mut once: Vec<(char, usize)> = labels
                    .iter()
                    .enumerate()
                    .filter_map(|(i, l)| match l {
                        Label::Letter(c) if count[i] == 1 => Some((*c, i)),
                        _ => None,
                    })
                    .collect();
                once.sort();
                o.extend(once.into_iter().map(|(_, i)| i));
                o
            }
        };
        let out_shape = out.iter().map(|&i| sizes[i]).collect();
        Ok(Resolved {
            labels,
            sizes,
            operand_labels,
            out,
            out_shape,
        })
    }

    /// Σ over contracted labels of the product of operands, with `mul`/`add` of `T`.
    #[allow(clippy::too_many_arguments)] // shapes, strides and the two scalar ops belong together
    fn compute<T: Copy>(
        &self,
        r: &Resolved,
        shapes: &[Vec<usize>],
        data: &[Vec<T>],
        zero: T,
        one: T,
        mul: impl Fn(T, T) -> T,
        add: impl Fn(T, T) -> T,
    ) -> Vec<T> {
        let nl = r.labels.len();
        // Per operand: stride of each label (sum over repeated dims = diagonal; 0 when broadcast).
        let strides: Vec<Vec<usize>> = r
            .operand_labels
            .iter()
            .zip(shapes)
            .map(|(ids, s)| {
                let mut st = vec![0usize; nl];
                let mut acc = 1;
                for d in (0..s.len()).rev() {
                    if s[d] != 1 {
                        st[ids[d]] += acc;
                    }
                    acc *= s[d];
                }
                st
            })
            .collect();
        let contracted: Vec<usize> = (0..nl).filter(|i| !r.out.contains(i)).collect();
        let order: Vec<usize> = r.out.iter().chain(&contracted).copied().collect();
        let n_out: usize = r.out_shape.iter().product();
        let n_red: usize = contracted.iter().map(|&i| r.sizes[i]).product();
        let mut out = vec![zero; n_out];
        if n_out == 0 {
            return out;
        }
        let mut idx = vec![0usize; order.len()];
        let mut offs = vec![0usize; data.len()];
        for o in out.iter_mut() {
            let mut acc = zero;
            for _ in 0..n_red {
                let mut p = one;
                for (k, d) in data.iter().enumerate() {
                    p = mul(p, d[offs[k]]);
                }
                acc = add(acc, p);
                // advance the odometer over all labels (contracted ones are innermost)
                Self::advance(&order, &r.sizes, &strides, &mut idx, &mut offs);
            }
            if n_red == 0 {
                Self::advance_out(&order, r.out.len(), &r.sizes, &strides, &mut idx, &mut offs);
            }
            *o = acc;
        }
        out
    }

    /// Two f32 operands without diagonals or broadcasting: permute to a batched matrix
    /// product (batch, rows, inner) · (batch, inner, cols), multiply with GEMM, permute back.
    fn as_matmul(
        &self,
        r: &Resolved,
        shapes: &[Vec<usize>],
        a: &[f32],
        b: &[f32],
    ) -> Result<Option<Vec<f32>>> {
        let (la, lb) = (&r.operand_labels[0], &r.operand_labels[1]);
        let distinct = |l: &[usize]| l.iter().enumerate().all(|(i, x)| !l[..i].contains(x));
        let exact = |l: &[usize], s: &[usize]| l.iter().zip(s).all(|(&x, &d)| r.sizes[x] == d);
        if !distinct(la) || !distinct(lb) || !exact(la, &shapes[0]) || !exact(lb, &shapes[1]) {
            return Ok(None);
        }
        // every contracted label must appear in both operands
        if (0..r.labels.len())
            .any(|l| !r.out.contains(&l) && (!la.contains(&l) || !lb.contains(&l)))
        {
            return Ok(None);
        }
        let pick = |f: &dyn Fn(usize) -> bool| -> Vec<usize> {
            r.out.iter().copied().filter(|&l| f(l)).collect()
        };
        let bl = pick(&|l| la.contains(&l) && lb.contains(&l));
        let ml = pick(&|l| la.contains(&l) && !lb.contains(&l));
        let nl = pick(&|l| !la.contains(&l) && lb.contains(&l));
        let kl: Vec<usize> = la.iter().copied().filter(|l| !r.out.contains(l)).collect();
        let size = |ls: &[usize]| ls.iter().map(|&l| r.sizes[l]).product::<usize>();
        let (bs, ms, ns, ks) = (size(&bl), size(&ml), size(&nl), size(&kl));
        let order_a: Vec<usize> = bl
            .iter()
            .chain(&ml)
            .chain(&kl)
            .map(|l| la.iter().position(|x| x == l).unwrap_or(0))
            .collect();
        let order_b: Vec<usize> = bl
            .iter()
            .chain(&kl)
            .chain(&nl)
            .map(|l| lb.iter().position(|x| x == l).unwrap_or(0))
            .collect();
        let pa = permute(a, &shapes[0], &order_a);
        let pb = permute(b, &shapes[1], &order_b);
        let plan = super::matmul_plan("Einsum", &[bs, ms, ks], &[bs, ks, ns])?;
        let mut y = vec![0.0f32; bs * ms * ns];
        super::matmul_float(&plan, &pa, &pb, &mut y)?;
        let res_labels: Vec<usize> = bl.iter().chain(&ml).chain(&nl).copied().collect();
        let res_shape: Vec<usize> = res_labels.iter().map(|&l| r.sizes[l]).collect();
        let back: Vec<usize> = r
            .out
            .iter()
            .map(|l| res_labels.iter().position(|x| x == l).unwrap_or(0))
            .collect();
        Ok(Some(permute(&y, &res_shape, &back)))
    }

    fn advance(
        order: &[usize],
        sizes: &[usize],
        strides: &[Vec<usize>],
        idx: &mut [usize],
        offs: &mut [usize],
    ) {
        for p in (0..order.len()).rev() {
            let l = order[p];
            idx[p] += 1;
            for (k, st) in strides.iter().enumerate() {
                offs[k] += st[l];
            }
            if idx[p] < sizes[l] {
                return;
            }
            for (k, st) in strides.iter().enumerate() {
                offs[k] -= st[l] * sizes[l];
            }
            idx[p] = 0;
        }
    }

    fn advance_out(
        order: &[usize],
        n_out: usize,
        sizes: &[usize],
        strides: &[Vec<usize>],
        idx: &mut [usize],
        offs: &mut [usize],
    ) {
        Self::advance(&order[..n_out], sizes, strides, &mut idx[..n_out], offs);
    }
}

/// Transposes `data` (shape `shape`): output dim `i` is input dim `perm[i]`.
fn permute<T: Copy>(data: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return data.to_vec();
    }
    let in_strides = kiln_core::strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let st: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let n = data.len();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_shape.len()];
    let mut off = 0usize;
    for _ in 0..n {
        out.push(data[off]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            off += st[d];
            if idx[d] < out_shape[d] {
                break;
            }
            off -= st[d] * out_shape[d];
            idx[d] = 0;
        }
    }
    out
}

impl Op for Einsum {
    fn op_type(&self) -> &str {
        "Einsum"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let dtype = inputs.first().copied().flatten().and_then(|f| f.dtype);
        let shapes: Option<Vec<Vec<usize>>> = inputs
            .iter()
            .map(|f| f.and_then(|f| f.concrete_shape()))
            .collect();
        let shape = match shapes {
            Some(s) => Some(
                self.resolve(&s)?
                    .out_shape
                    .into_iter()
                    .map(Dim::Known)
                    .collect(),
            ),
            None => None,
        };
        Ok(vec![Fact {
            dtype,
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let ts: Vec<&Tensor> = (0..inputs.len())
            .map(|i| input_tensor(inputs, i, "Einsum"))
            .collect::<Result<_>>()?;
        let dtype = ts
            .first()
            .map(|t| t.dtype())
            .ok_or_else(|| KilnError::kernel("Einsum", "no inputs"))?;
        if ts.iter().any(|t| t.dtype() != dtype) {
            return Err(KilnError::kernel(
                "Einsum",
                "all inputs must share one dtype",
            ));
        }
        let shapes: Vec<Vec<usize>> = ts.iter().map(|t| t.shape().to_vec()).collect();
        let r = self.resolve(&shapes)?;
        let out = if dtype == kiln_core::DType::F32 && ts.len() == 2 {
            let (a, b) = (ts[0].as_slice::<f32>()?, ts[1].as_slice::<f32>()?);
            match self.as_matmul(&r, &shapes, a, b)? {
                Some(y) => Tensor::from_vec(&r.out_shape, y)?,
                None => {
                    let data = vec![a.to_vec(), b.to_vec()];
                    Tensor::from_vec(
                        &r.out_shape,
                        self.compute(&r, &shapes, &data, 0.0f32, 1.0, |a, b| a * b, |a, b| a + b),
                    )?
                }
            }
        } else if dtype.is_float() {
            let data = ts
                .iter()
                .map(|t| t.to_f64_vec())
                .collect::<Result<Vec<_>>>()?;
            let y = self.compute(&r, &shapes, &data, 0.0, 1.0, |a, b| a * b, |a, b| a + b);
            Tensor::from_vec(&r.out_shape, y)?.cast(dtype)?
        } else if dtype.is_int() {
            let data = ts
                .iter()
                .map(|t| t.to_i64_vec())
                .collect::<Result<Vec<_>>>()?;
            let y = self.compute(
                &r,
                &shapes,
                &data,
                0i64,
                1i64,
                i64::wrapping_mul,
                i64::wrapping_add,
            );
            Tensor::from_vec(&r.out_shape, y)?.cast(dtype)?
        } else {
            return Err(KilnError::kernel(
                "Einsum",
                format!("unsupported dtype {dtype}"),
            ));
        };
        Ok(vec![out.into()])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Attr, DType, OpDesc};

    fn run(eq: &str, ts: Vec<Tensor>) -> Result<Tensor> {
        let mut desc = OpDesc::new("", "Einsum", 12);
        desc.attrs
            .insert("equation".into(), Attr::String(eq.into()));
        let op = build_einsum(&BuildCtx {
            node: "e",
            desc: &desc,
            n_inputs: ts.len(),
            n_outputs: 1,
        })?;
        let vals: Vec<Value> = ts.into_iter().map(Value::from).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(Some).collect();
        op.eval(&refs)?.remove(0).into_tensor()
    }

    fn t(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|v| v as f32 - 2.0).collect()).unwrap()
    }

    #[test]
    fn einsum_cases() {
        let a = t(&[2, 3]);
        let b = t(&[3, 4]);
        let mm = run("ij,jk->ik", vec![a.clone(), b.clone()]).unwrap();
        let imp = run("ij,jk", vec![a.clone(), b.clone()]).unwrap();
        assert!(mm.same_as(&imp));
        let (av, bv) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        let mut want = vec![0.0f32; 8];
        for i in 0..2 {
            for k in 0..4 {
                for j in 0..3 {
                    want[i * 4 + k] += av[i * 3 + j] * bv[j * 4 + k];
                }
            }
        }
        assert_eq!(mm.as_slice::<f32>().unwrap(), want.as_slice());
        assert_eq!(run("ij->ji", vec![a.clone()]).unwrap().shape(), &[3, 2]);
        assert_eq!(
            run("ij->", vec![a.clone()])
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &[3.0]
        );
        let sq = t(&[3, 3]);
        assert_eq!(
            run("ii->i", vec![sq.clone()])
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &[-2.0, 2.0, 6.0]
        );
        assert_eq!(
            run("ii", vec![sq]).unwrap().as_slice::<f32>().unwrap(),
            &[6.0]
        );
        let x = t(&[2, 2, 3]);
        let y = t(&[2, 3, 2]);
        let bm = run("...ij,...jk->...ik", vec![x.clone(), y.clone()]).unwrap();
        assert_eq!(bm.shape(), &[2, 2, 2]);
        let bm2 = run("bij,bjk->bik", vec![x, y]).unwrap();
        assert!(bm.same_as(&bm2));
        // broadcast ellipsis and implicit output with ellipsis
        let p = t(&[1, 3]);
        let q = t(&[4, 3]);
        assert_eq!(run("...j,...j->...", vec![p, q]).unwrap().shape(), &[4]);
        let v = Tensor::from_vec(&[3], vec![1i64, 2, 3]).unwrap();
        assert_eq!(
            run("i,i", vec![v.clone(), v.clone()])
                .unwrap()
                .as_slice::<i64>()
                .unwrap(),
            &[14]
        );
        assert_eq!(
            run("i,j->ij", vec![v.clone(), v.clone()]).unwrap().shape(),
            &[3, 3]
        );
        assert!(run("ij,jk->ik", vec![a.clone(), a.clone()]).is_err());
        assert!(run("ij->k", vec![a.clone()]).is_err());
        assert!(run("i$", vec![v]).is_err());
        // the matmul lowering agrees with the plain loop (f64 goes through the loop)
        let q = t(&[2, 3, 4, 5]);
        let k = t(&[2, 4, 6, 5]);
        let fast = run("bqhd,bhkd->bhqk", vec![q.clone(), k.clone()]).unwrap();
        let slow = run(
            "bqhd,bhkd->bhqk",
            vec![q.cast(DType::F64).unwrap(), k.cast(DType::F64).unwrap()],
        )
        .unwrap();
        assert_eq!(fast.shape(), &[2, 4, 3, 6]);
        let (f, s) = (fast.to_f64_vec().unwrap(), slow.to_f64_vec().unwrap());
        assert!(f
            .iter()
            .zip(&s)
            .all(|(a, b)| (a - b).abs() < 1e-3 * b.abs().max(1.0)));
    }
}
