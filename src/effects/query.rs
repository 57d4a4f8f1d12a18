//! Reading effect records for the status queries and the workers.

use crate::core::codec;
use crate::core::keys::{self, Space};
use crate::error::StoreError;
use crate::store::Store;

use crate::core::effect::{EffectInfo, EffectKey, EffectRecord};

/// Finds the record of `key` in the outbox or the history.
pub(crate) fn find(
    store: &Store,
    space: Space,
    key: &EffectKey,
) -> Result<Option<(Vec<u8>, EffectRecord)>, StoreError> {
    if key.entity.len() > keys::ENTITY_NAME_LEN_MAX || key.key.len() > keys::ENTITY_KEY_LEN_MAX {
        return Ok(None);
    }
    let prefix = keys::entity_prefix(space, &key.entity, &key.key);
    for entry in store.scan_prefix(&prefix)? {
        let (k, v) = entry?;
        if let Ok(record) = codec::decode::<EffectRecord>("effect record", &v) {
            if record.info.effect_key == *key {
                return Ok(Some((k, record)));
            }
        }
    }
    Ok(None)
}

/// Every effect record of one entity, unfinished first (in recorded order), then finished.
pub(crate) fn of_entity(
    store: &Store,
    entity: &str,
    key: &str,
) -> Result<Vec<EffectInfo>, StoreError> {
    let mut out = Vec::new();
    for space in [Space::Outbox, Space::EffectHistory] {
        for entry in store.scan_prefix(&keys::entity_prefix(space, entity, key))? {
            let (_, v) = entry?;
            if let Ok(record) = codec::decode::<EffectRecord>("effect record", &v) {
                out.push(record.info);
            }
        }
    }
    Ok(out)
}
