//! What a steered run adds, and where: the llama-free half of applying a
//! control vector (the eval callback that adds it lives in the main crate's
//! capture path). A [`Steer`] is built from a [`ControlVector`] and checked
//! against the model it will run on, so nothing is applied half-way: a
//! vector of another model, a non-finite scale, layers the model or the
//! vector lacks, and positions outside the context are refused up front.

use std::collections::BTreeMap;
use std::fmt;

use super::ControlVector;
use crate::error::{Error, Result};
use crate::select::LayerFilter;

/// Which rows of a steered layer get the vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Every row.
    All,
    /// The prompt's rows only.
    Prompt,
    /// The rows of generated tokens only (each sampled token fed back).
    Generated,
    /// Rows whose position `p` lies in `start <= p < end`.
    Range {
        /// First position steered.
        start: i32,
        /// One past the last position steered.
        end: i32,
    },
}

impl Positions {
    /// `all`, `prompt`, `generated`, `A..B` (half-open) or `A..=B` (inclusive),
    /// positions counted from 0.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "positions '{s}': use all, prompt, generated, A..B (half-open) or A..=B, with 0 <= A < B"
            ))
        };
        match s.trim() {
            "all" => return Ok(Self::All),
            "prompt" => return Ok(Self::Prompt),
            "generated" => return Ok(Self::Generated),
            _ => {}
        }
        let num = |x: &str| x.trim().parse::<i32>().map_err(|_| bad());
        let (start, end) = if let Some((a, b)) = s.split_once("..=") {
            (num(a)?, num(b)?.checked_add(1).ok_or_else(bad)?)
        } else if let Some((a, b)) = s.split_once("..") {
            (num(a)?, num(b)?)
        } else {
            return Err(bad());
        };
        if start < 0 || start >= end {
            return Err(bad());
        }
        Ok(Self::Range { start, end })
    }

    /// Refuse a range that starts outside a context of `n_ctx` positions (it
    /// could never steer a row).
    pub fn check(&self, n_ctx: usize) -> Result<()> {
        match *self {
            Self::Range { start, .. } if start as usize >= n_ctx => Err(Error::invalid(format!(
                "positions {self} start outside the context of {n_ctx} positions (0..{n_ctx})"
            ))),
            _ => Ok(()),
        }
    }

    /// True when the row at `pos` (a prompt row when `prompt`) is steered.
    pub fn contains(&self, pos: i32, prompt: bool) -> bool {
        match *self {
            Self::All => true,
            Self::Prompt => prompt,
            Self::Generated => !prompt,
            Self::Range { start, end } => (start..end).contains(&pos),
        }
    }
}

impl fmt::Display for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Prompt => f.write_str("prompt"),
            Self::Generated => f.write_str("generated"),
            Self::Range { start, end } => write!(f, "{start}..{end}"),
        }
    }
}

impl ControlVector {
    /// Refuse a vector made for another model: rows not `n_embd` wide, or a
    /// direction for a layer the model (of `n_layer` layers) does not have.
    pub fn check_model(&self, n_layer: usize, n_embd: usize) -> Result<()> {
        if self.n_embd != n_embd {
            return Err(Error::invalid(format!(
                "its directions are {} wide but the model's n_embd is {n_embd}: it was made for another model",
                self.n_embd
            )));
        }
        if let Some((&l, _)) = self
            .directions
            .iter()
            .next_back()
            .filter(|(&l, _)| l >= n_layer)
        {
            return Err(Error::invalid(format!(
                "it has direction.{l} but the model has {n_layer} layers (0..{n_layer}): it was made for another model"
            )));
        }
        Ok(())
    }
}

/// The node family steered unless told otherwise: `l_out` (llama.cpp's
/// control vectors act on the output of each block).
pub const STEER_TENSOR: &str = "l_out";

/// Refuse a name that cannot be a node family `TENSOR` (whose nodes are
/// `TENSOR-N`, one per layer): empty, longer than a ggml name leaves room
/// for, ending in `-`, or holding `#`, `*`, `,` or white space.
pub fn check_family(tensor: &str) -> Result<()> {
    let ok = !tensor.is_empty()
        && tensor.len() <= 56
        && !tensor.ends_with('-')
        && !tensor.contains(|c: char| matches!(c, '#' | '*' | ',') || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "tensor '{tensor}' is not a node family: give a name such as l_out or attn_out (nodes TENSOR-N, one per layer N)"
        )))
    }
}

/// Refuse a scale that is not a finite number.
pub fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "scale {scale} is not a finite number"
        )))
    }
}

/// A steering vector ready to apply: `scale × directions[N]` is added to the
/// rows of `l_out-N` (llama.cpp's control-vector convention: `direction.N`
/// goes to the output of block `N`), or of another node family `TENSOR-N`
/// ([`Steer::on`]), at `positions`, for the sequences `seqs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Steer {
    /// Row width.
    pub n_embd: usize,
    /// The node family steered: `TENSOR-N` gets `directions[N]` (default
    /// `l_out`, where llama.cpp adds its control vectors).
    pub tensor: String,
    /// Layer `N` → the direction added to `TENSOR-N` (`n_embd` values, unscaled).
    pub directions: BTreeMap<usize, Vec<f32>>,
    /// Multiplies every direction.
    pub scale: f32,
    /// Which rows.
    pub positions: Positions,
    /// The sequence ids steered; `None`: all of them.
    pub seqs: Option<Vec<i32>>,
}

impl Steer {
    /// The directions of `v` chosen by `layers` (all of them when `None`),
    /// times `scale`, at `positions`, for every sequence, checked against a
    /// model of `n_layer` layers and width `n_embd`. Errors name the value:
    /// the vector's width or layers (another model), a non-finite scale, a
    /// layer outside `1..n_layer` or one the vector has no direction for, a
    /// filter keeping nothing.
    pub fn new(
        v: &ControlVector,
        scale: f32,
        layers: Option<&LayerFilter>,
        positions: Positions,
        n_layer: usize,
        n_embd: usize,
    ) -> Result<Self> {
        v.validate()?;
        v.check_model(n_layer, n_embd)?;
        check_scale(scale)?;
        let directions = match layers {
            None => v.directions.clone(),
            Some(f) => {
                let (lo, hi) = f.bounds();
                if lo < 1 || hi as usize >= n_layer {
                    let bad = if lo < 1 { lo } else { hi };
                    return Err(Error::invalid(format!(
                        "layer {bad} cannot be steered: the model's steerable layers are 1..={}",
                        n_layer - 1
                    )));
                }
                let mut d = BTreeMap::new();
                for l in (lo..=hi).filter(|&l| f.contains(l)) {
                    let l = l as usize;
                    let dir = v.directions.get(&l).ok_or_else(|| {
                        Error::invalid(format!(
                            "layer {l}: the vector has no direction.{l} (it has layers {})",
                            layer_list(v.directions.keys().copied())
                        ))
                    })?;
                    d.insert(l, dir.clone());
                }
                d
            }
        };
        if directions.is_empty() {
            return Err(Error::invalid("no layer left to steer"));
        }
        Ok(Self {
            n_embd,
            tensor: STEER_TENSOR.to_string(),
            directions,
            scale,
            positions,
            seqs: None,
        })
    }

    /// The same steer applied to the node family `tensor` (`attn_out` steers
    /// `attn_out-N` for each layer `N`) instead of `l_out`. The name is
    /// checked here; whether the model's graph has each `TENSOR-N` with
    /// `n_embd`-wide rows is [`super::Edits::check`]'s to say.
    pub fn on(mut self, tensor: &str) -> Result<Self> {
        check_family(tensor)?;
        self.tensor = tensor.to_string();
        Ok(self)
    }

    /// The node steered at layer `layer`: `TENSOR-layer`.
    pub fn node(&self, layer: usize) -> String {
        format!("{}-{layer}", self.tensor)
    }

    /// What a front end reports of this steer (serve's answer, the Python
    /// result): layers, positions, scale, each direction's norm before
    /// scaling, the nodes steered, and `source` as given.
    pub fn summary(&self, source: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "layers": self.layers(),
            "positions": self.positions.to_string(),
            "scale": self.scale,
            "vector_norm": self.norms().into_values().collect::<Vec<_>>(),
            "tensors": self.layers().iter().map(|&l| self.node(l)).collect::<Vec<_>>(),
            "source": source,
        })
    }

    /// Check the steer fits a model of `n_layer` layers of width `n_embd`
    /// and a context of `n_ctx` positions: its width, its layers
    /// (`1..n_layer`), its scale and its positions.
    pub fn check(&self, n_layer: usize, n_embd: usize, n_ctx: usize) -> Result<()> {
        if self.n_embd != n_embd {
            return Err(Error::invalid(format!(
                "the steering vector is {} wide but the model's n_embd is {n_embd}",
                self.n_embd
            )));
        }
        if let Some((l, d)) = self
            .directions
            .iter()
            .find(|(&l, d)| l == 0 || l >= n_layer || d.len() != n_embd)
        {
            return Err(Error::invalid(format!(
                "steering layer {l} ({} values) does not fit the model: layers 1..={}, n_embd {n_embd}",
                d.len(),
                n_layer.saturating_sub(1)
            )));
        }
        check_scale(self.scale)?;
        self.positions.check(n_ctx)
    }

    /// The layers steered, ascending.
    pub fn layers(&self) -> Vec<usize> {
        self.directions.keys().copied().collect()
    }

    /// The Euclidean norm of each layer's direction (before scaling).
    pub fn norms(&self) -> BTreeMap<usize, f64> {
        self.directions
            .iter()
            .map(|(&l, d)| {
                let n = d.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
                (l, n)
            })
            .collect()
    }

    /// The row added to `l_out-N` for each steered layer: `scale × direction`,
    /// each product rounded to f32 once (what llama.cpp adds when its control
    /// vector was loaded with that strength).
    pub fn scaled(&self) -> impl Iterator<Item = (usize, Vec<f32>)> + '_ {
        self.directions
            .iter()
            .map(|(&l, d)| (l, d.iter().map(|&x| x * self.scale).collect()))
    }

    /// True when the row of sequence `seq` at `pos` (a prompt row when
    /// `prompt`) gets the vector.
    pub fn applies(&self, seq: i32, pos: i32, prompt: bool) -> bool {
        self.seqs.as_ref().map_or(true, |s| s.contains(&seq))
            && self.positions.contains(pos, prompt)
    }
}

/// `1,2,5..=9`-style list of layers, ranges collapsed.
pub fn layer_list(layers: impl IntoIterator<Item = usize>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(usize, usize)> = None;
    let flush = |out: &mut Vec<String>, r: (usize, usize)| {
        out.push(if r.0 == r.1 {
            r.0.to_string()
        } else {
            format!("{}..={}", r.0, r.1)
        })
    };
    for l in layers {
        run = match run {
            Some((a, b)) if l == b + 1 => Some((a, l)),
            Some(r) => {
                flush(&mut out, r);
                Some((l, l))
            }
            None => Some((l, l)),
        };
    }
    if let Some(r) = run {
        flush(&mut out, r);
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> ControlVector {
        ControlVector {
            n_embd: 2,
            model_hint: "llama".into(),
            directions: [
                (1, vec![3.0, 4.0]),
                (2, vec![1.0, 0.0]),
                (3, vec![0.0, -2.0]),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn positions_parse_contain_and_refuse() {
        assert_eq!(Positions::parse("all").unwrap(), Positions::All);
        assert_eq!(Positions::parse("prompt").unwrap(), Positions::Prompt);
        assert_eq!(Positions::parse("generated").unwrap(), Positions::Generated);
        let r = Positions::parse("2..5").unwrap();
        assert_eq!(r, Positions::Range { start: 2, end: 5 });
        assert_eq!(Positions::parse("2..=4").unwrap(), r);
        assert_eq!(r.to_string(), "2..5");
        assert!(!r.contains(1, true) && r.contains(2, true) && r.contains(4, false));
        assert!(!r.contains(5, false));
        assert!(Positions::Prompt.contains(9, true) && !Positions::Prompt.contains(9, false));
        assert!(Positions::Generated.contains(9, false));
        for bad in [
            "",
            "some",
            "5..3",
            "3..3",
            "-1..4",
            "a..b",
            "1..",
            "..4",
            "2..=2147483647",
        ] {
            let e = Positions::parse(bad).unwrap_err();
            assert!(e.message().contains(&format!("'{bad}'")), "{e}");
        }
        assert!(r.check(5).is_ok() && r.check(3).is_ok());
        let e = Positions::parse("10..20").unwrap().check(8).unwrap_err();
        assert!(
            e.message()
                .contains("10..20 start outside the context of 8"),
            "{e}"
        );
    }

    #[test]
    fn steer_picks_layers_scales_and_refuses_other_models() {
        let v = vector();
        let s = Steer::new(&v, 2.0, None, Positions::All, 4, 2).unwrap();
        assert_eq!(s.layers(), [1, 2, 3]);
        assert_eq!(s.norms()[&1], 5.0);
        let scaled: Vec<_> = s.scaled().collect();
        assert_eq!(scaled[0], (1, vec![6.0, 8.0]));
        assert!(s.applies(7, 0, true));
        let f = LayerFilter::parse("2..4").unwrap();
        let s = Steer::new(&v, -1.0, Some(&f), Positions::Generated, 4, 2).unwrap();
        assert_eq!(s.layers(), [2, 3]);
        assert!(!s.applies(0, 3, true) && s.applies(0, 3, false));
        let only = Steer {
            seqs: Some(vec![1]),
            ..s.clone()
        };
        assert!(only.applies(1, 3, false) && !only.applies(0, 3, false));
        assert_eq!(s.node(2), "l_out-2");
        let a = s.clone().on("attn_out").unwrap();
        assert_eq!(
            (
                a.node(3),
                a.summary(serde_json::json!("vector"))["tensors"].clone()
            ),
            (
                "attn_out-3".to_string(),
                serde_json::json!(["attn_out-2", "attn_out-3"])
            )
        );
        for bad in ["", "l_out-", "l_out-*", "a b", "x#2"] {
            let e = s.clone().on(bad).unwrap_err().message().to_string();
            assert!(e.contains("is not a node family"), "{bad}: {e}");
        }

        let err = |r: Result<Steer>| r.unwrap_err().message().to_string();
        let e = err(Steer::new(&v, 1.0, None, Positions::All, 4, 3));
        assert!(e.contains("2 wide but the model's n_embd is 3"), "{e}");
        let e = err(Steer::new(&v, 1.0, None, Positions::All, 3, 2));
        assert!(e.contains("direction.3 but the model has 3 layers"), "{e}");
        for s in [f32::NAN, f32::INFINITY] {
            let e = err(Steer::new(&v, s, None, Positions::All, 4, 2));
            assert!(e.contains("is not a finite number"), "{e}");
        }
        let f = LayerFilter::parse("2..=7").unwrap();
        let e = err(Steer::new(&v, 1.0, Some(&f), Positions::All, 4, 2));
        assert!(
            e.contains("layer 7 cannot be steered") && e.contains("1..=3"),
            "{e}"
        );
        let f = LayerFilter::parse("0").unwrap();
        let e = err(Steer::new(&v, 1.0, Some(&f), Positions::All, 4, 2));
        assert!(e.contains("layer 0 cannot be steered"), "{e}");
        let mut gap = v.clone();
        gap.directions.remove(&2);
        let f = LayerFilter::parse("1..=2").unwrap();
        let e = err(Steer::new(&gap, 1.0, Some(&f), Positions::All, 4, 2));
        assert!(
            e.contains("layer 2: the vector has no direction.2 (it has layers 1,3)"),
            "{e}"
        );
        assert_eq!(layer_list([1, 2, 3, 5, 7, 8]), "1..=3,5,7..=8");
    }
}
