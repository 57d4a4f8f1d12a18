//! The dedup and effect-history purge: on a timer, and on demand.

use std::sync::Weak;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

use crate::clock::ms_of;
use crate::core::codec;
use crate::core::keys::Space;
use crate::core::records::DedupStamp;
use crate::effects::{self};
use crate::error::{OpenError, StoreError};

use crate::runtime::inner::Inner;

pub(crate) fn start_purge(
    inner: Weak<Inner>,
) -> Result<(Sender<()>, thread::JoinHandle<()>), OpenError> {
    let (stop, stopped) = bounded::<()>(0);
    let every = inner.upgrade().map_or(Duration::from_secs(3600), |i| {
        i.shared.config.dedup_purge_every
    });
    let handle = thread::Builder::new()
        .name("keystead-dedup-purge".into())
        .spawn(move || loop {
            // The channel is a timer that shutdown can interrupt; it never carries a value.
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let Some(inner) = inner.upgrade() else { return };
            match purge_expired(&inner) {
                Ok(removed) => tracing::debug!(target: "keystead", removed, "dedup purge"),
                Err(e) => {
                    tracing::warn!(target: "keystead", error = %e, "dedup purge failed; will retry")
                }
            }
        })
        .map_err(|e| OpenError::Threads(e.to_string()))?;
    Ok((stop, handle))
}

/// Removes dedup records strictly older than the retention window; never one inside it,
/// and never one rewritten since it was read.
pub(crate) fn purge_expired(inner: &Inner) -> Result<u64, StoreError> {
    let now = inner.shared.clock.now_ms();
    let retention_ms = ms_of(inner.shared.config.dedup_retention);
    let mut removed = 0;
    for entry in inner.store.scan_prefix(&[Space::Dedup as u8])? {
        let (key, value) = entry?;
        let stamp = value
            .split_first()
            .filter(|(version, _)| **version == codec::FORMAT_VERSION)
            .and_then(|(_, body)| {
                bincode::serde::decode_from_slice::<DedupStamp, _>(
                    body,
                    bincode::config::standard(),
                )
                .ok()
            });
        let Some((stamp, _)) = stamp else {
            tracing::warn!(target: "keystead", "undecodable dedup record kept by the purge");
            continue;
        };
        let age_ms = now.saturating_sub(stamp.recorded_at_ms);
        if age_ms > retention_ms && inner.store.remove_if_unchanged(&key, &value)? {
            removed += 1;
        }
    }
    // Finished effects (done, failed or superseded) leave the history after the same window; dead
    // letters stay until an operator requeues or inspects them.
    for entry in inner.store.scan_prefix(&[Space::EffectHistory as u8])? {
        let (key, value) = entry?;
        let Ok(record) = codec::decode::<effects::EffectRecord>("effect record", &value) else {
            continue;
        };
        let finished = matches!(
            record.info.status,
            effects::EffectStatus::Done
                | effects::EffectStatus::Failed
                | effects::EffectStatus::Superseded
        );
        let age_ms = now.saturating_sub(record.info.updated_at_ms);
        if finished && age_ms > retention_ms && inner.store.remove_if_unchanged(&key, &value)? {
            removed += 1;
        }
    }
    Ok(removed)
}
