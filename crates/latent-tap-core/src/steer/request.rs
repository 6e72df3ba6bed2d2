//! One steer or patch asked for by a front end (a `serve` request's entry, a
//! Python `Steer`/`Patch`), checked in one place: each value goes through the
//! library's validator, and an error says which field was at fault
//! ([`FieldError`]), so every front end names fields the same way
//! (`steer[0].layers: …`, `patch[1].pos: …`).

use serde_json::Value;

use super::{check_node, check_scale, ControlVector, Patch, Positions, Steer};
use crate::error::Error;
use crate::select::{GraphNode, LayerFilter};

/// A value at fault: the field (`layers`, `scale`, `positions`, `tensor`,
/// `data`, `pos`) and why.
#[derive(Debug)]
pub struct FieldError {
    /// The request's name of the field.
    pub field: &'static str,
    /// What is wrong with it.
    pub error: Error,
}

fn at(field: &'static str) -> impl Fn(Error) -> FieldError {
    move |error| FieldError { field, error }
}

/// What the checks need of the model and the run.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    /// Layers of the model.
    pub n_layer: usize,
    /// Row width.
    pub n_embd: usize,
    /// Positions a sequence's context holds.
    pub n_ctx: usize,
    /// One past the last position the run can reach (prompt + tokens to
    /// generate, at most `n_ctx`).
    pub end: usize,
    /// The model's graph (the nodes an edit may name).
    pub graph: &'a [GraphNode],
}

/// A steer entry, its vector already read (from values or a file).
#[derive(Debug)]
pub struct SteerRequest<'a> {
    /// The directions.
    pub vector: &'a ControlVector,
    /// A layer filter (`"6..10"`, `"3,5"`); `None`: the vector's layers.
    pub layers: Option<&'a str>,
    /// Multiplies the vector.
    pub scale: f32,
    /// `all`, `prompt`, `generated`, `A..B`, `A..=B`; `None`: all.
    pub positions: Option<&'a str>,
    /// The node family steered; `None`: `l_out`.
    pub tensor: Option<&'a str>,
}

impl SteerRequest<'_> {
    /// The steer, checked against `lim`, and its summary with `source`
    /// ([`Steer::summary`]).
    pub fn build(&self, source: Value, lim: &Limits<'_>) -> Result<(Steer, Value), FieldError> {
        check_scale(self.scale).map_err(at("scale"))?;
        let filter = self
            .layers
            .map(LayerFilter::parse)
            .transpose()
            .map_err(at("layers"))?;
        let positions = match self.positions {
            None => Positions::All,
            Some(p) => Positions::parse(p).map_err(at("positions"))?,
        };
        positions.check(lim.n_ctx).map_err(at("positions"))?;
        let s = Steer::new(
            self.vector,
            self.scale,
            filter.as_ref(),
            positions,
            lim.n_layer,
            lim.n_embd,
        )
        .map_err(at("layers"))?;
        let s = match self.tensor {
            None => s,
            Some(t) => s.on(t).map_err(at("tensor"))?,
        };
        for l in s.layers() {
            check_node(lim.graph, &s.node(l), lim.n_embd).map_err(at("tensor"))?;
        }
        let summary = s.summary(source);
        Ok((s, summary))
    }
}

/// A patch entry: the row of node `tensor` at `pos` becomes `data`, checked
/// against `lim` (the node against the graph first).
pub fn patch(
    tensor: &str,
    pos: i64,
    data: Vec<f32>,
    lim: &Limits<'_>,
) -> Result<Patch, FieldError> {
    let bad_data = data.len() != lim.n_embd || data.iter().any(|x| !x.is_finite());
    let bad_pos = pos < 0 || pos as u64 >= lim.end as u64;
    // The library names the value at fault; the field blamed is the first of
    // tensor, data, pos that is wrong.
    let field = if Patch::new(tensor, 0, vec![0.0; lim.n_embd], lim.n_embd, 1).is_err() {
        "tensor"
    } else if bad_data {
        "data"
    } else if bad_pos {
        "pos"
    } else {
        "tensor"
    };
    let p = Patch::new(tensor, pos, data, lim.n_embd, lim.end).map_err(at(field))?;
    check_node(lim.graph, &p.tensor, lim.n_embd).map_err(at("tensor"))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> GraphNode {
        super::super::edit::tests::node(name, Some(2))
    }

    #[test]
    fn each_value_is_checked_and_its_field_named() {
        let graph: Vec<GraphNode> = [
            "l_out-1",
            "l_out-2",
            "l_out-3",
            "attn_out-1",
            "attn_out-2",
            "attn_out-3",
        ]
        .into_iter()
        .map(node)
        .collect();
        let lim = Limits {
            n_layer: 4,
            n_embd: 2,
            n_ctx: 16,
            end: 10,
            graph: &graph,
        };
        let v = ControlVector::from_values(&[3.0, 4.0], 4, 2).unwrap();
        let req = |layers, scale, positions, tensor| SteerRequest {
            vector: &v,
            layers,
            scale,
            positions,
            tensor,
        };
        let (s, sum) = req(Some("2..4"), 2.0, Some("generated"), None)
            .build(serde_json::json!("vector"), &lim)
            .unwrap();
        assert_eq!(
            (s.layers(), s.positions, s.scale),
            (vec![2, 3], Positions::Generated, 2.0)
        );
        assert_eq!(sum["tensors"], serde_json::json!(["l_out-2", "l_out-3"]));
        assert_eq!(sum["vector_norm"], serde_json::json!([5.0, 5.0]));
        let (s, _) = req(None, 1.0, None, Some("attn_out"))
            .build(Value::Null, &lim)
            .unwrap();
        assert_eq!(s.node(1), "attn_out-1");
        let field = |r: SteerRequest<'_>| {
            let e = r.build(Value::Null, &lim).unwrap_err();
            (e.field, e.error.message().to_string())
        };
        assert_eq!(field(req(None, f32::NAN, None, None)).0, "scale");
        assert_eq!(field(req(Some("x"), 1.0, None, None)).0, "layers");
        assert_eq!(field(req(Some("0"), 1.0, None, None)).0, "layers");
        assert_eq!(field(req(None, 1.0, Some("9..2"), None)).0, "positions");
        assert_eq!(field(req(None, 1.0, Some("20..30"), None)).0, "positions");
        let (f, m) = field(req(None, 1.0, None, Some("ffn_out")));
        assert!(f == "tensor" && m.contains("no node 'ffn_out-1'"), "{m}");
        assert_eq!(field(req(None, 1.0, None, Some("a b"))).0, "tensor");

        let p = patch("attn_out-2", 3, vec![1.0, 2.0], &lim).unwrap();
        assert_eq!(
            p.summary(),
            serde_json::json!({"tensor": "attn_out-2", "pos": 3, "norm": 5f64.sqrt()})
        );
        let pf = |t: &str, pos: i64, d: Vec<f32>| {
            let e = patch(t, pos, d, &lim).unwrap_err();
            (e.field, e.error.message().to_string())
        };
        assert_eq!(pf("l_out-1", 0, vec![1.0]).0, "data");
        assert_eq!(pf("l_out-1", 0, vec![1.0, f32::NAN]).0, "data");
        assert_eq!(pf("l_out-1", 10, vec![1.0, 2.0]).0, "pos");
        assert_eq!(pf("", 10, vec![1.0]).0, "tensor");
        let (f, m) = pf("l_out-9", 0, vec![1.0, 2.0]);
        assert!(f == "tensor" && m.contains("has no node 'l_out-9'"), "{m}");
    }
}
