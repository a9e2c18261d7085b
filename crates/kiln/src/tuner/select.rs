//! Choosing one tactic per layer over the whole graph, counting the reformat layers that
//! neighbouring choices in different formats force.
//!
//! The cost of an assignment is the sum of the chosen tactics' times plus, for every tensor
//! passed between two ends in different formats, the time of the reformat layer that
//! converts it. Method (see docs/tuning.md):
//!
//! 1. **Min-sum dynamic programming** in topological order. Each layer's table holds, per
//!    candidate, its time plus the best cost of everything feeding it. A layer feeding
//!    several consumers is charged once, through its first consumer (its *primary* edge);
//!    the other edges add only their reformat cost. This is exact when every layer feeds at
//!    most one other layer (chains and in-trees — most of a CNN or transformer block).
//! 2. **Coordinate descent** on the exact cost: each layer in turn takes the candidate that
//!    minimises its time plus the reformats on all its edges given its neighbours' choices,
//!    until a sweep changes nothing. This repairs the DP's optimism at fan-outs and never
//!    increases the cost.

use kiln_core::Format;

/// One end of a tensor edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A layer being tuned (index into [`Problem::layers`]).
    Layer(usize),
    /// Something whose format is fixed: engine inputs/outputs, untuned layers.
    Fixed(Format),
}

/// A tensor passed from one end to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// Producer.
    pub from: End,
    /// Consumer.
    pub to: End,
}

/// One candidate of a layer: the format it reads and writes, and its measured time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Option_ {
    /// Format of the layer's activations under this candidate.
    pub format: Format,
    /// Measured time (ms).
    pub time: f64,
}

/// The choice problem. Layers are in topological order: every edge between two layers goes
/// from a lower index to a higher one.
#[derive(Debug, Clone, Default)]
pub struct Problem {
    /// Candidates per layer (each non-empty).
    pub layers: Vec<Vec<Option_>>,
    /// Tensor edges.
    pub edges: Vec<Edge>,
}

/// The chosen candidate per layer and the total cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Index of the chosen candidate, per layer.
    pub choice: Vec<usize>,
    /// Tactic time plus reformat time (ms).
    pub cost: f64,
}

/// Reformat cost (ms) of edge `e` converting `from` into `to`; 0 when they are equal.
pub trait ReformatCost {
    /// The cost; called only with `from != to`.
    fn cost(&mut self, edge: usize, from: Format, to: Format) -> f64;
}

impl<F: FnMut(usize, Format, Format) -> f64> ReformatCost for F {
    fn cost(&mut self, edge: usize, from: Format, to: Format) -> f64 {
        self(edge, from, to)
    }
}

fn reformat(rc: &mut dyn ReformatCost, e: usize, from: Format, to: Format) -> f64 {
    if from == to {
        0.0
    } else {
        rc.cost(e, from, to)
    }
}

impl Problem {
    fn format_of(&self, end: End, choice: &[usize]) -> Format {
        match end {
            End::Fixed(f) => f,
            End::Layer(l) => self.layers[l][choice[l]].format,
        }
    }

    /// Exact cost of an assignment.
    pub fn cost(&self, choice: &[usize], rc: &mut dyn ReformatCost) -> f64 {
        let times: f64 = self
            .layers
            .iter()
            .zip(choice)
            .map(|(opts, &k)| opts[k].time)
            .sum();
        let reformats: f64 = self
            .edges
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (a, b) = (self.format_of(e.from, choice), self.format_of(e.to, choice));
                reformat(rc, i, a, b)
            })
            .sum();
        times + reformats
    }

    /// The fastest candidate of each layer, ignoring reformats (what a layer-by-layer choice
    /// would take).
    pub fn greedy(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|opts| {
                (0..opts.len())
                    .min_by(|&a, &b| opts[a].time.total_cmp(&opts[b].time))
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Sum of each layer's fastest time, no reformat counted: what layer-by-layer choice
    /// believes it gets.
    pub fn greedy_cost(&self) -> f64 {
        self.layers
            .iter()
            .map(|opts| opts.iter().map(|o| o.time).fold(f64::INFINITY, f64::min))
            .filter(|t| t.is_finite())
            .sum()
    }

    /// Solves the problem (dynamic programming, then coordinate descent).
    pub fn solve(&self, rc: &mut dyn ReformatCost) -> Solution {
        let mut choice = self.dynamic_programming(rc);
        self.descend(&mut choice, rc);
        let cost = self.cost(&choice, rc);
        Solution { choice, cost }
    }

    /// Step 1: min-sum DP, exact on in-trees.
    fn dynamic_programming(&self, rc: &mut dyn ReformatCost) -> Vec<usize> {
        let n = self.layers.len();
        // The first edge (in edge order) leaving each layer towards another layer.
        let mut primary: Vec<Option<usize>> = vec![None; n];
        for (i, e) in self.edges.iter().enumerate() {
            if let (End::Layer(a), End::Layer(_)) = (e.from, e.to) {
                primary[a].get_or_insert(i);
            }
        }
        let mut table: Vec<Vec<f64>> = Vec::with_capacity(n);
        // back[e][k] = producer's best candidate for edge e when the consumer takes k.
        let mut back: Vec<Vec<usize>> = vec![Vec::new(); self.edges.len()];
        for (l, opts) in self.layers.iter().enumerate() {
            let mut row: Vec<f64> = opts.iter().map(|o| o.time).collect();
            for (i, e) in self.edges.iter().enumerate() {
                // Reformats towards fixed consumers (engine outputs, untuned layers).
                if let (End::Layer(p), End::Fixed(f)) = (e.from, e.to) {
                    if p == l {
                        for (k, o) in opts.iter().enumerate() {
                            row[k] += reformat(rc, i, o.format, f);
                        }
                    }
                }
                if e.to != End::Layer(l) {
                    continue;
                }
                back[i] = vec![0; opts.len()];
                for (k, o) in opts.iter().enumerate() {
                    let add = match e.from {
                        End::Fixed(f) => reformat(rc, i, f, o.format),
                        End::Layer(p) => {
                            let carried = primary[p] == Some(i);
                            let mut best = (f64::INFINITY, 0);
                            for (j, po) in self.layers[p].iter().enumerate() {
                                let base = if carried { table[p][j] } else { 0.0 };
                                let c = base + reformat(rc, i, po.format, o.format);
                                if c < best.0 {
                                    best = (c, j);
                                }
                            }
                            back[i][k] = best.1;
                            best.0
                        }
                    };
                    row[k] += add;
                }
            }
            table.push(row);
        }
        let mut choice = vec![0usize; n];
        for l in (0..n).rev() {
            choice[l] = match primary[l] {
                Some(i) => {
                    let End::Layer(c) = self.edges[i].to else {
                        unreachable!("primary edges end at layers")
                    };
                    back[i][choice[c]]
                }
                // A root (feeds no tuned layer): its own best.
                None => (0..table[l].len())
                    .min_by(|&a, &b| table[l][a].total_cmp(&table[l][b]))
                    .unwrap_or(0),
            };
        }
        choice
    }

    /// Step 2: coordinate descent on the exact cost.
    fn descend(&self, choice: &mut [usize], rc: &mut dyn ReformatCost) {
        let incident: Vec<Vec<usize>> = (0..self.layers.len())
            .map(|l| {
                (0..self.edges.len())
                    .filter(|&i| {
                        self.edges[i].from == End::Layer(l) || self.edges[i].to == End::Layer(l)
                    })
                    .collect()
            })
            .collect();
        for _sweep in 0..32 {
            let mut changed = false;
            for l in 0..self.layers.len() {
                let local = |k: usize, choice: &mut [usize], rc: &mut dyn ReformatCost| {
                    let old = choice[l];
                    choice[l] = k;
                    let c = self.layers[l][k].time
                        + incident[l]
                            .iter()
                            .map(|&i| {
                                let e = self.edges[i];
                                let (a, b) =
                                    (self.format_of(e.from, choice), self.format_of(e.to, choice));
                                reformat(rc, i, a, b)
                            })
                            .sum::<f64>();
                    choice[l] = old;
                    c
                };
                let current = local(choice[l], choice, rc);
                let mut best = (current, choice[l]);
                for k in 0..self.layers[l].len() {
                    let c = local(k, choice, rc);
                    // Move only on a real improvement, so the loop ends.
                    if c < best.0 - 1e-12 {
                        best = (c, k);
                    }
                }
                if best.1 != choice[l] {
                    choice[l] = best.1;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Layout, Precision};

    const F32: Format = Format::FP32_LINEAR;
    const F16: Format = Format {
        precision: Precision::Fp16,
        layout: Layout::Linear,
    };

    fn opt(format: Format, time: f64) -> Option_ {
        Option_ { format, time }
    }

    fn chain(layers: Vec<Vec<Option_>>) -> Problem {
        let n = layers.len();
        let mut edges = vec![Edge {
            from: End::Fixed(F32),
            to: End::Layer(0),
        }];
        for l in 1..n {
            edges.push(Edge {
                from: End::Layer(l - 1),
                to: End::Layer(l),
            });
        }
        edges.push(Edge {
            from: End::Layer(n - 1),
            to: End::Fixed(F32),
        });
        Problem { layers, edges }
    }

    fn brute_force(p: &Problem, rc: &mut dyn ReformatCost) -> f64 {
        let mut best = f64::INFINITY;
        let mut choice = vec![0usize; p.layers.len()];
        loop {
            best = best.min(p.cost(&choice, rc));
            let mut i = 0;
            loop {
                if i == choice.len() {
                    return best;
                }
                choice[i] += 1;
                if choice[i] < p.layers[i].len() {
                    break;
                }
                choice[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn expensive_reformats_keep_one_precision() {
        // Layer by layer, FP16 wins at layers 0 and 2, FP32 at 1 and 3; every switch costs 5.
        let p = chain(vec![
            vec![opt(F32, 10.0), opt(F16, 8.0)],
            vec![opt(F32, 7.0), opt(F16, 9.0)],
            vec![opt(F32, 10.0), opt(F16, 8.0)],
            vec![opt(F32, 7.0), opt(F16, 9.0)],
        ]);
        let mut rc = |_e: usize, _a: Format, _b: Format| 5.0;
        let greedy = p.greedy();
        assert_eq!(greedy, vec![1, 0, 1, 0]);
        // greedy: 8+7+8+7 + five switches (in, 3 between, none out) ... = 30 + 20 = 50
        assert_eq!(p.cost(&greedy, &mut rc), 50.0);
        let s = p.solve(&mut rc);
        // All FP32: 34, no reformat at all.
        assert_eq!(s.choice, vec![0, 0, 0, 0]);
        assert_eq!(s.cost, 34.0);
    }

    #[test]
    fn cheap_reformats_allow_a_mixed_graph() {
        let p = chain(vec![
            vec![opt(F32, 10.0), opt(F16, 2.0)],
            vec![opt(F32, 10.0), opt(F16, 2.0)],
            vec![opt(F32, 1.0), opt(F16, 9.0)],
        ]);
        let mut rc = |_e: usize, _a: Format, _b: Format| 0.5;
        let s = p.solve(&mut rc);
        // F16, F16, F32: 2+2+1 plus reformat in (0.5) and between layers 1 and 2 (0.5).
        assert_eq!(s.choice, vec![1, 1, 0]);
        assert_eq!(s.cost, 6.0);
    }

    /// A tiny deterministic generator (no zeros: times in [0.1, 10.1)).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % 10_000) as f64 / 1000.0 + 0.1
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() * 1000.0) as usize % n
        }
    }

    fn random_problem(r: &mut Lcg, n: usize, tree: bool) -> Problem {
        let formats = [F32, F16];
        let layers: Vec<Vec<Option_>> = (0..n)
            .map(|_| {
                let k = 1 + r.below(3);
                (0..k).map(|_| opt(formats[r.below(2)], r.next())).collect()
            })
            .collect();
        let mut edges = Vec::new();
        let mut consumers = vec![0usize; n];
        for l in 0..n {
            // One or two producers: the previous layer or an earlier one, or the engine input.
            let fan_in = 1 + r.below(2);
            for _ in 0..fan_in {
                let from = if l == 0 || r.below(5) == 0 {
                    End::Fixed(F32)
                } else {
                    let p = r.below(l);
                    if tree && consumers[p] > 0 {
                        End::Fixed(F32)
                    } else {
                        consumers[p] += 1;
                        End::Layer(p)
                    }
                };
                edges.push(Edge {
                    from,
                    to: End::Layer(l),
                });
            }
        }
        for (l, &c) in consumers.iter().enumerate() {
            if c == 0 || r.below(4) == 0 {
                edges.push(Edge {
                    from: End::Layer(l),
                    to: End::Fixed(F32),
                });
            }
        }
        Problem { layers, edges }
    }

    #[test]
    fn exact_on_trees_and_never_worse_than_greedy_on_dags() {
        let mut r = Lcg(7);
        for case in 0..300 {
            let tree = case % 2 == 0;
            let n = 1 + r.below(7);
            let p = random_problem(&mut r, n, tree);
            let weights: Vec<f64> = (0..p.edges.len()).map(|_| r.next()).collect();
            let mut rc = |e: usize, _a: Format, _b: Format| weights[e];
            let s = p.solve(&mut rc);
            assert!((p.cost(&s.choice, &mut rc) - s.cost).abs() < 1e-9);
            let greedy = p.cost(&p.greedy(), &mut rc);
            assert!(
                s.cost <= greedy + 1e-9,
                "case {case}: {} > greedy {greedy}",
                s.cost
            );
            let best = brute_force(&p, &mut rc);
            if tree {
                assert!(
                    (s.cost - best).abs() < 1e-9,
                    "case {case} (tree): {} vs optimum {best}",
                    s.cost
                );
            } else {
                assert!(s.cost >= best - 1e-9);
            }
        }
    }
}
