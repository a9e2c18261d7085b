//! Integer matrix products: MatMulInteger (i32 output) and QLinearMatMul (requantized).
//! Zero points and scales are per tensor (scalars), per row of A or per column of B.

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, Result, Tensor, Value,
};

use super::{matmul_dims, matmul_plan, MatMulPlan};

/// Per-tensor, per-row (A) or per-column (B) parameter values.
fn per_index(op: &str, t: Option<&Tensor>, n: usize, what: &str) -> Result<Vec<f64>> {
    let Some(t) = t else { return Ok(vec![0.0]) };
    let v = t.to_f64_vec()?;
    if v.len() == 1 || (v.len() == n && n > 0) {
        Ok(v)
    } else {
        Err(KilnError::kernel(
            op,
            format!(
                "{what} of shape {:?} must be a scalar or have {n} values",
                t.shape()
            ),
        ))
    }
}

#[inline]
fn pick(v: &[f64], i: usize) -> f64 {
    if v.len() == 1 {
        v[0]
    } else {
        v[i]
    }
}

/// Exact products of zero-point-shifted integers: one i64 accumulator per output.
fn int_product(plan: &MatMulPlan, a: &[f64], b: &[f64], az: &[f64], bz: &[f64]) -> Vec<i64> {
    let MatMulPlan { m, k, n, .. } = *plan;
    let mut out = vec![0i64; plan.offsets.len() * m * n];
    for (bi, &(oa, ob)) in plan.offsets.iter().enumerate() {
        for i in 0..m {
            let za = pick(az, i);
            for j in 0..n {
                let zb = pick(bz, j);
                let mut acc = 0i64;
                for l in 0..k {
                    acc += ((a[oa + i * k + l] - za) * (b[ob + l * n + j] - zb)) as i64;
                }
                out[(bi * m + i) * n + j] = acc;
            }
        }
    }
    out
}

fn check_8bit(op: &str, t: &Tensor, what: &str) -> Result<()> {
    if matches!(t.dtype(), DType::U8 | DType::I8) {
        Ok(())
    } else {
        Err(KilnError::kernel(
            op,
            format!("{what} must be u8 or i8, found {}", t.dtype()),
        ))
    }
}

fn infer_shape(
    op: &str,
    a: Option<&Fact>,
    b: Option<&Fact>,
    dtype: Option<DType>,
) -> Result<Vec<Fact>> {
    let shape = match (
        a.and_then(|f| f.shape.as_ref()),
        b.and_then(|f| f.shape.as_ref()),
    ) {
        (Some(sa), Some(sb)) => Some(matmul_dims(op, sa, sb)?),
        _ => None,
    };
    Ok(vec![Fact {
        dtype,
        shape,
        ..Fact::unknown()
    }])
}

/// Wraps a rounded value into an integer dtype like numpy's `astype` (ONNX's reference and
/// test data for QLinearMatMul do not saturate).
fn wrap_to(v: f64, dtype: DType) -> f64 {
    let i = v as i64;
    match dtype {
        DType::U8 => i as u8 as f64,
        DType::I8 => i as i8 as f64,
        DType::U16 => i as u16 as f64,
        DType::I16 => i as i16 as f64,
        DType::I32 => i as i32 as f64,
        _ => v,
    }
}

/// ONNX MatMulInteger.
#[derive(Debug, Clone)]
pub struct MatMulInteger;

/// Builds MatMulInteger.
pub fn build_matmul_integer(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(MatMulInteger))
}

impl Op for MatMulInteger {
    fn op_type(&self) -> &str {
        "MatMulInteger"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        infer_shape(
            "MatMulInteger",
            inputs.first().copied().flatten(),
            inputs.get(1).copied().flatten(),
            Some(DType::I32),
        )
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "MatMulInteger";
        let a = input_tensor(inputs, 0, op)?;
        let b = input_tensor(inputs, 1, op)?;
        check_8bit(op, a, "A")?;
        check_8bit(op, b, "B")?;
        let plan = matmul_plan(op, a.shape(), b.shape())?;
        let az = per_index(op, optional_tensor(inputs, 2, op)?, plan.m, "a_zero_point")?;
        let bz = per_index(op, optional_tensor(inputs, 3, op)?, plan.n, "b_zero_point")?;
        let y = int_product(&plan, &a.to_f64_vec()?, &b.to_f64_vec()?, &az, &bz);
        let y: Vec<i32> = y.into_iter().map(|v| v as i32).collect();
        Ok(vec![Tensor::from_vec(&plan.out_shape, y)?.into()])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// ONNX QLinearMatMul.
#[derive(Debug, Clone)]
pub struct QLinearMatMul;

/// Builds QLinearMatMul.
pub fn build_qlinear_matmul(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(QLinearMatMul))
}

impl Op for QLinearMatMul {
    fn op_type(&self) -> &str {
        "QLinearMatMul"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let dtype = inputs.get(7).copied().flatten().and_then(|f| f.dtype);
        infer_shape(
            "QLinearMatMul",
            inputs.first().copied().flatten(),
            inputs.get(3).copied().flatten(),
            dtype,
        )
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "QLinearMatMul";
        let a = input_tensor(inputs, 0, op)?;
        let b = input_tensor(inputs, 3, op)?;
        check_8bit(op, a, "A")?;
        check_8bit(op, b, "B")?;
        let plan = matmul_plan(op, a.shape(), b.shape())?;
        let a_scale = per_index(op, Some(input_tensor(inputs, 1, op)?), plan.m, "a_scale")?;
        let az = per_index(op, optional_tensor(inputs, 2, op)?, plan.m, "a_zero_point")?;
        let b_scale = per_index(op, Some(input_tensor(inputs, 4, op)?), plan.n, "b_scale")?;
        let bz = per_index(op, optional_tensor(inputs, 5, op)?, plan.n, "b_zero_point")?;
        let y_scale = per_index(op, Some(input_tensor(inputs, 6, op)?), 1, "y_scale")?[0];
        let yz_t = optional_tensor(inputs, 7, op)?;
        let yz = per_index(op, yz_t, 1, "y_zero_point")?[0];
        let out_dtype = yz_t.map_or(a.dtype(), |t| t.dtype());
        let acc = int_product(&plan, &a.to_f64_vec()?, &b.to_f64_vec()?, &az, &bz);
        let (m, n) = (plan.m, plan.n);
        // Scales are f32 in the model: combine them in f32 like the reference does.
        let y: Vec<f64> = acc
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (r, c) = ((i / n.max(1)) % m.max(1), i % n.max(1));
                let s =
                    (pick(&a_scale, r) as f32 * pick(&b_scale, c) as f32 / y_scale as f32) as f64;
                wrap_to((v as f64 * s + yz).round_ties_even(), out_dtype)
            })
            .collect();
        Ok(vec![Tensor::from_vec(&plan.out_shape, y)?
            .cast(out_dtype)?
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
    fn matmul_integer_with_zero_points() {
        let a: Value = Tensor::from_vec(&[2, 3], vec![11u8, 7, 3, 10, 6, 2])
            .unwrap()
            .into();
        let b: Value = Tensor::from_vec(&[3, 2], vec![1u8, 4, 2, 5, 3, 6])
            .unwrap()
            .into();
        let az: Value = Tensor::scalar(12u8).into();
        let bz: Value = Tensor::scalar(0u8).into();
        let y = MatMulInteger
            .eval(&[Some(&a), Some(&b), Some(&az), Some(&bz)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        // rows of A - 12: [-1,-5,-9], [-2,-6,-10]
        assert_eq!(y.as_slice::<i32>().unwrap(), &[-38, -83, -44, -98]);
        let bad: Value = Tensor::from_vec(&[2], vec![1u8, 2]).unwrap().into();
        assert!(MatMulInteger
            .eval(&[Some(&a), Some(&b), Some(&bad)])
            .is_ok());
        let bad3: Value = Tensor::from_vec(&[3], vec![1u8, 2, 3]).unwrap().into();
        assert!(MatMulInteger
            .eval(&[Some(&a), Some(&b), Some(&bad3)])
            .is_err());
    }

    #[test]
    fn qlinear_matmul_example() {
        // ONNX's QLinearMatMul example (uint8).
        let a: Value = Tensor::from_vec(&[2, 4], vec![208u8, 236, 0, 238, 3, 214, 255, 29])
            .unwrap()
            .into();
        let b: Value = Tensor::from_vec(
            &[4, 3],
            vec![152u8, 51, 244, 60, 26, 255, 0, 127, 246, 127, 254, 247],
        )
        .unwrap()
        .into();
        let s = |v: f32| -> Value { Tensor::scalar(v).into() };
        let z = |v: u8| -> Value { Tensor::scalar(v).into() };
        let (a_s, a_z, b_s, b_z, y_s, y_z) =
            (s(0.0066), z(113), s(0.00705), z(114), s(0.0107), z(118));
        let y = QLinearMatMul
            .eval(&[
                Some(&a),
                Some(&a_s),
                Some(&a_z),
                Some(&b),
                Some(&b_s),
                Some(&b_z),
                Some(&y_s),
                Some(&y_z),
            ])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[168, 115, 255, 1, 66, 151]);
    }
}
