//! `slider-worker`: the process the engine sends model work to. It owns the node kinds that
//! run on a device (`train`, `xy_plot`, `evaluate`) with their code versions, decodes each
//! request's typed parameters (`slider-protocol`) and calls the crate that does the work:
//! `slider-trainer`, the X/Y grid here, `slider-evaluate`.

pub mod kinds;
pub mod xy_plot;

pub use kinds::{KINDS, Kind, execute, versions};
