//! One module per subcommand.

pub mod capture;
pub mod dataset;
pub mod lens;
pub mod listen;
pub mod patch_flags;
pub mod patch_sweep;
pub mod rpc_server;
#[cfg(feature = "serve")]
pub mod serve;
pub mod steer_flags;
pub mod steer_vector;
pub mod synth;
pub mod tensors;
