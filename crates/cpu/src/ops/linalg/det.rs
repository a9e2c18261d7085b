//! Det: determinants of square matrices over the last two dims (LU with partial pivoting).

use kiln_core::{input_tensor, BuildCtx, Fact, KilnError, Op, Result, Tensor, Value};

/// ONNX Det.
#[derive(Debug, Clone)]
pub struct Det;

/// Builds Det.
pub fn build_det(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Det))
}

/// Determinant of one n×n row-major matrix (destroyed).
fn det(a: &mut [f64], n: usize) -> f64 {
    let mut d = 1.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))
            .unwrap_or(c);
        if a[p * n + c] == 0.0 {
            return 0.0;
        }
        if p != c {
            for j in 0..n {
                a.swap(p * n + j, c * n + j);
            }
            d = -d;
        }
        let pv = a[c * n + c];
        d *= pv;
        for r in c + 1..n {
            let f = a[r * n + c] / pv;
            if f != 0.0 {
                for j in c..n {
                    a[r * n + j] -= f * a[c * n + j];
                }
            }
        }
    }
    d
}

impl Op for Det {
    fn op_type(&self) -> &str {
        "Det"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let shape = x
            .and_then(|f| f.shape.as_ref())
            .map(|s| s[..s.len().saturating_sub(2)].to_vec());
        Ok(vec![Fact {
            dtype: x.and_then(|f| f.dtype),
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "Det")?;
        let s = x.shape();
        if s.len() < 2 || s[s.len() - 1] != s[s.len() - 2] {
            return Err(KilnError::kernel(
                "Det",
                format!("X must be [..., M, M], found {s:?}"),
            ));
        }
        if !x.dtype().is_float() {
            return Err(KilnError::kernel(
                "Det",
                format!("X must be a float tensor, found {}", x.dtype()),
            ));
        }
        let n = s[s.len() - 1];
        let v = x.to_f64_vec()?;
        let out: Vec<f64> = if n == 0 {
            vec![1.0; s[..s.len() - 2].iter().product()]
        } else {
            v.chunks(n * n).map(|m| det(&mut m.to_vec(), n)).collect()
        };
        Ok(vec![Tensor::from_vec(&s[..s.len() - 2], out)?
            .cast(x.dtype())?
            .into()])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn determinants() {
        let x: Value =
            Tensor::from_vec(&[2, 2, 2], vec![1.0f32, 2.0, 3.0, 4.0, 0.0, 1.0, 1.0, 0.0])
                .unwrap()
                .into();
        let y = Det
            .eval(&[Some(&x)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.shape(), &[2]);
        let v = y.as_slice::<f32>().unwrap();
        assert!((v[0] + 2.0).abs() < 1e-6 && (v[1] + 1.0).abs() < 1e-6);
        let x: Value = Tensor::from_vec(
            &[3, 3],
            vec![2.0f64, -3.0, 1.0, 2.0, 0.0, -1.0, 1.0, 4.0, 5.0],
        )
        .unwrap()
        .into();
        let y = Det
            .eval(&[Some(&x)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert!((y.as_slice::<f64>().unwrap()[0] - 49.0).abs() < 1e-9);
        let bad: Value = Tensor::from_vec(&[2, 3], vec![1.0f32; 6]).unwrap().into();
        assert!(Det.eval(&[Some(&bad)]).is_err());
    }
}
