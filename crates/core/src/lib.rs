//! kiln-core: the intermediate representation shared by every part of kiln.
//!
//! - [`DType`], [`Tensor`], [`Value`]: data.
//! - [`Fact`], [`Dim`]: build-time knowledge (shapes with symbolic dims, constants).
//! - [`Graph`], [`Node`], [`Op`]: the IR and the operator trait.
//! - [`exec::run_graph`]: the plain interpreter (oracle, subgraphs, constant folding).
//! - [`passes`]: graph optimisation passes; [`planner`]: activation memory planning.

pub mod attr;
pub mod buffer;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod fact;
pub mod graph;
pub mod lowp;
pub mod op;
pub mod passes;
pub mod planner;
pub mod tactic;
pub mod tensor;
pub mod value;

pub use attr::{Attr, AttrReader, OpDesc};
pub use buffer::{AlignedBuf, Arena, Bytes};
pub use dtype::{DType, Element};
pub use error::{KilnError, Result};
pub use fact::{Dim, Fact, ValueKind};
pub use graph::{Graph, Node, ValueId, ValueInfo};
pub use op::{BuildCtx, Op, OpBuilder, OpRegistry};
pub use tactic::{Format, Layout, Precision, Tactic};
pub use tensor::{numel, strides, CastOptions, Shape, Tensor, TensorMut};
pub use value::{input_tensor, optional_tensor, Value};
