//! The entity used by the measurements (`examples/memory.rs`, `benches/ask.rs`): a 200-byte
//! state, a one-byte command, never failing. Shared so that every figure measures the same
//! record size.

use keystead::{Context, Entity, Failure, FailureKind};
use serde::{Deserialize, Serialize};

/// A 200-byte state, the record size the benchmarks use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Blob {
    bytes: Vec<u8>,
    touched: u64,
}

impl Default for Blob {
    fn default() -> Self {
        Self {
            bytes: vec![0; 200],
            touched: 0,
        }
    }
}

/// The error of a handler that never fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("never")]
pub struct Never;

impl Failure for Never {
    fn kind(&self) -> FailureKind {
        FailureKind::Permanent
    }
}

/// Writes its command byte into the state and counts the change.
impl Blob {
    /// Writes `b` into the state and counts the change.
    pub fn touch(&mut self, b: u8) -> u64 {
        self.bytes[0] = b;
        self.touched += 1;
        self.touched
    }
}

pub struct Item;

impl Entity for Item {
    const NAME: &'static str = "item";
    type State = Blob;
    type Command = u8;
    type Reply = u64;
    type Error = Never;
    fn handle(s: &mut Blob, b: &u8, _: &mut Context<'_>) -> Result<u64, Never> {
        Ok(s.touch(*b))
    }
}
