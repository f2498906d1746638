//! `process.Process`: starting, streaming, signalling processes.

use crate::state::EnvdState;

pub struct ProcessService {
    #[allow(dead_code)]
    state: EnvdState,
}

impl ProcessService {
    pub fn new(state: EnvdState) -> Self {
        Self { state }
    }
}
