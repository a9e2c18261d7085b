//! String ops: `StringConcat`, `StringNormalizer`, `StringSplit`, `RegexFullMatch`, and the
//! n-gram counter `TfIdfVectorizer` (strings or integer tokens).

use std::any::Any;

use kiln_core::fact::{broadcast_dims, broadcast_shapes};
use kiln_core::{BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("StringConcat", |_| Ok(Box::new(StringConcat)));
    reg.register("StringNormalizer", build_string_normalizer);
    reg.register("StringSplit", build_string_split);
    reg.register("RegexFullMatch", build_regex_full_match);
    reg.register("TfIdfVectorizer", build_tfidf);
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

/// A token of an n-gram.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Token {
    Int(i64),
    Str(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Weighting {
    Tf,
    Idf,
    TfIdf,
}

/// `TfIdfVectorizer`: counts pool n-grams (with skips) in each row of tokens.
#[derive(Debug)]
pub struct TfIdfVectorizer {
    min_gram: usize,
    max_gram: usize,
    max_skip: usize,
    mode: Weighting,
    /// n-gram → output column.
    grams: std::collections::HashMap<Vec<Token>, usize>,
    output_size: usize,
    weights: Vec<f32>,
    strings: bool,
}

fn build_tfidf(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let size = |n: &str| -> Result<usize> {
        let v = a.req_int(n)?;
        usize::try_from(v).map_err(|_| a.invalid(format!("{n} {v} is negative")))
    };
    let (min_gram, max_gram, max_skip) = (
        size("min_gram_length")?,
        size("max_gram_length")?,
        size("max_skip_count")?,
    );
    if min_gram == 0 || min_gram > max_gram {
        return Err(a.invalid(format!(
            "need 1 <= min_gram_length ({min_gram}) <= max_gram_length ({max_gram})"
        )));
    }
    let mode = match a.string("mode", "")?.as_str() {
        "TF" => Weighting::Tf,
        "IDF" => Weighting::Idf,
        "TFIDF" => Weighting::TfIdf,
        m => return Err(a.invalid(format!("mode must be TF, IDF or TFIDF, found {m:?}"))),
    };
    let ints = a.opt_ints("pool_int64s")?.unwrap_or_default();
    let strs = a.opt_strings("pool_strings")?.unwrap_or_default();
    let strings = ints.is_empty() && !strs.is_empty();
    let pool: Vec<Token> = if strings {
        strs.into_iter().map(Token::Str).collect()
    } else {
        ints.into_iter().map(Token::Int).collect()
    };
    let counts = a.ints("ngram_counts")?;
    let indexes = a.ints("ngram_indexes")?;
    let output_size = indexes.iter().max().map_or(0, |m| (*m).max(-1) + 1) as usize;
    let mut grams = std::collections::HashMap::new();
    let mut id = 0usize;
    for (i, &start) in counts.iter().enumerate() {
        let n = i + 1;
        let end = counts.get(i + 1).copied().unwrap_or(pool.len() as i64);
        let (start, end) = (usize::try_from(start), usize::try_from(end));
        let (Ok(start), Ok(end)) = (start, end) else {
            return Err(a.invalid("ngram_counts holds a negative offset"));
        };
        if start > end || end > pool.len() {
            return Err(a.invalid(format!(
                "ngram_counts range {start}..{end} is out of the pool of {}",
                pool.len()
            )));
        }
        for gram in pool[start..end].chunks_exact(n) {
            if (min_gram..=max_gram).contains(&n) {
                let col = indexes
                    .get(id)
                    .copied()
                    .ok_or_else(|| a.invalid(format!("ngram_indexes lacks entry {id}")))?;
                let col = usize::try_from(col)
                    .map_err(|_| a.invalid(format!("negative ngram index {col}")))?;
                grams.insert(gram.to_vec(), col);
            }
            id += 1;
        }
    }
    let weights = a.opt_floats("weights")?.unwrap_or_default();
    Ok(Box::new(TfIdfVectorizer {
        min_gram,
        max_gram,
        max_skip,
        mode,
        grams,
        output_size,
        weights,
        strings,
    }))
}

impl TfIdfVectorizer {
    /// Adds the n-gram counts of one row of tokens into `freq`.
    fn count_row(&self, row: &[Token], freq: &mut [f32]) {
        let len = row.len();
        let mut gram = Vec::with_capacity(self.max_gram);
        for skip in 0..=self.max_skip {
            let d = skip + 1;
            // Unigrams do not depend on the skip distance: count them once.
            let min_n = if skip > 0 {
                self.min_gram.max(2)
            } else {
                self.min_gram
            };
            if min_n > self.max_gram {
                break;
            }
            for start in 0..len {
                gram.clear();
                for n in 1..=self.max_gram {
                    let pos = start + (n - 1) * d;
                    if pos >= len {
                        break;
                    }
                    gram.push(row[pos].clone());
                    if n >= min_n {
                        if let Some(&col) = self.grams.get(&gram) {
                            freq[col] += 1.0;
                        }
                    }
                }
            }
        }
    }
}

impl Op for TfIdfVectorizer {
    fn op_type(&self) -> &str {
        "TfIdfVectorizer"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let shape = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|f| f.shape.clone())
            .map(|s| match s.len() {
                2 => vec![s[0].clone(), Dim::Known(self.output_size)],
                _ => vec![Dim::Known(self.output_size)],
            });
        Ok(vec![Fact {
            shape,
            ..Fact::of_dtype(DType::F32)
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "TfIdfVectorizer";
        let x = kiln_core::input_tensor(inputs, 0, OP)?;
        let tokens: Vec<Token> = if x.dtype() == DType::String {
            x.as_strings()?.iter().cloned().map(Token::Str).collect()
        } else if x.dtype().is_int() {
            x.to_i64_vec()?.into_iter().map(Token::Int).collect()
        } else {
            return Err(KilnError::kernel(
                OP,
                format!(
                    "input must be string or integer tokens, found {}",
                    x.dtype()
                ),
            ));
        };
        if (x.dtype() == DType::String) != self.strings && !self.grams.is_empty() {
            return Err(KilnError::kernel(
                OP,
                "input token type does not match the pool",
            ));
        }
        let (rows, cols, out_shape) = match *x.shape() {
            [] => (1, 1, vec![self.output_size]),
            [c] => (1, c, vec![self.output_size]),
            [b, c] => (b, c, vec![b, self.output_size]),
            _ => {
                return Err(KilnError::kernel(
                    OP,
                    format!("input must be [C] or [B, C], found {:?}", x.shape()),
                ))
            }
        };
        let mut freq = vec![0f32; rows * self.output_size];
        if cols > 0 {
            for (r, row) in tokens.chunks(cols).enumerate() {
                self.count_row(
                    row,
                    &mut freq[r * self.output_size..(r + 1) * self.output_size],
                );
            }
        }
        let w = &self.weights;
        for (i, f) in freq.iter_mut().enumerate() {
            let col = i % self.output_size.max(1);
            *f = match self.mode {
                Weighting::Tf => *f,
                Weighting::Idf if w.is_empty() => f32::from(u8::from(*f > 0.0)),
                Weighting::Idf => {
                    if *f > 0.0 {
                        w.get(col).copied().unwrap_or(0.0)
                    } else {
                        0.0
                    }
                }
                Weighting::TfIdf if w.is_empty() => *f,
                Weighting::TfIdf => w.get(col).copied().unwrap_or(0.0) * *f,
            };
        }
        Ok(vec![Value::Tensor(Tensor::from_vec(&out_shape, freq)?)])
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

    #[test]
    fn tfidf_counts_ngrams_with_skips() {
        // Pool: unigrams [2, 3, 5, 4], bigrams [(5,6), (7,8), (6,7)].
        let op = build(
            build_tfidf,
            "TfIdfVectorizer",
            9,
            vec![
                ("min_gram_length", Attr::Int(2)),
                ("max_gram_length", Attr::Int(2)),
                ("max_skip_count", Attr::Int(0)),
                ("mode", Attr::String("TF".into())),
                ("ngram_counts", Attr::Ints(vec![0, 4])),
                ("ngram_indexes", Attr::Ints(vec![0, 1, 2, 3, 4, 5, 6])),
                (
                    "pool_int64s",
                    Attr::Ints(vec![2, 3, 5, 4, 5, 6, 7, 8, 6, 7]),
                ),
            ],
            1,
            1,
        )
        .unwrap();
        let x = Tensor::from_vec(&[12], vec![1i32, 1, 3, 3, 3, 7, 8, 6, 7, 5, 6, 8]).unwrap();
        let y = run(op.as_ref(), &[tv(x.clone())])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.to_f32_vec().unwrap(), vec![0., 0., 0., 0., 1., 1., 1.]);
        let op5 = build(
            build_tfidf,
            "TfIdfVectorizer",
            9,
            vec![
                ("min_gram_length", Attr::Int(1)),
                ("max_gram_length", Attr::Int(2)),
                ("max_skip_count", Attr::Int(5)),
                ("mode", Attr::String("TF".into())),
                ("ngram_counts", Attr::Ints(vec![0, 4])),
                ("ngram_indexes", Attr::Ints(vec![0, 1, 2, 3, 4, 5, 6])),
                (
                    "pool_int64s",
                    Attr::Ints(vec![2, 3, 5, 4, 5, 6, 7, 8, 6, 7]),
                ),
            ],
            1,
            1,
        )
        .unwrap();
        let x2 = Tensor::from_vec(&[2, 6], vec![1i32, 1, 3, 3, 3, 7, 8, 6, 7, 5, 6, 8]).unwrap();
        let y = run(op5.as_ref(), &[tv(x2)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.shape(), &[2, 7]);
        assert_eq!(
            y.to_f32_vec().unwrap(),
            // ONNX's tf_batch_uniandbigrams_skip5 expected output.
            vec![0., 3., 0., 0., 0., 0., 0., 0., 0., 1., 0., 1., 1., 1.]
        );
        assert!(run(op.as_ref(), &[tv(Tensor::zeros(DType::F32, &[2]))]).is_err());
    }
}
