//! The layout of keys in keystead's one sled tree.
//!
//! Every record lives in one tree so that a whole commit is one atomic `apply_batch`. A key is
//! `keyspace byte ++ entity prefix ++ suffix`, where the entity prefix is
//! `len(type) as u8 ++ type ++ len(key) as u16 big-endian ++ key`. The length prefixes make the
//! encoding prefix-free, so within a keyspace one entity's records are contiguous and a
//! prefix scan returns exactly that entity's records, in a stable (byte) order.
//!
//! | keyspace | suffix | value |
//! |---|---|---|
//! | `S` state | none | `StateRecord` |
//! | `D` dedup | message id bytes | `DedupRecord` |
//! | `I` inbox | sequence, u64 big-endian, then the lane byte (absent in entries written before lanes: `Normal`) | `InboxRecord` |
//! | `Q` lane index | none: `Q ++ shard u16 BE ++ lane u8 ++ sequence u64 BE` | the inbox key |
//! | `H` shed log | message id bytes | `ShedRecord` |
//! | `R` raise | none | `RaiseRecord`: the lane `prioritise` raised the entity's effects to |
//! | `L` dead letters | message id bytes | `DeadLetterRecord` |
//! | `M` meta | a name | small markers (layout version) |
//! | `O` outbox | sequence u64 BE ++ index u32 BE ++ lane u8 (absent before lanes: `Normal`) | `EffectRecord`, unfinished |
//! | `P` outbox lane index | none: `P ++ lane u8 ++ sequence u64 BE ++ index u32 BE` | the outbox key |
//! | `X` effect history | same as the outbox | `EffectRecord`, finished |
//! | `T` timers | none: `T ++ due ms u64 BE ++ sequence u64 BE` | `TimerRecord`: a delayed message |
//! | `K` timer by id | message id bytes | the `T` key of the entity's delayed message with that id |
//! | `C` schedules | none: `C ++ name` | `ScheduleRecord` |

use crate::priority::Priority;

/// The keyspace byte that leads a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Space {
    State = b'S',
    Dedup = b'D',
    Inbox = b'I',
    DeadLetter = b'L',
    Meta = b'M',
    Outbox = b'O',
    EffectHistory = b'X',
    LaneIndex = b'Q',
    Shed = b'H',
    Raise = b'R',
    OutboxIndex = b'P',
    Timer = b'T',
    TimerId = b'K',
    Schedule = b'C',
    /// The keys of each entity type in plain byte order (no length prefix), for listing.
    EntityIndex = b'E',
    /// The change feed: `F ++ feed sequence u64 BE`, in commit order.
    Feed = b'F',
    /// Change feed consumers: `G ++ name`, holding the position acknowledged.
    FeedConsumer = b'G',
}

/// The longest entity type name accepted (it is stored with a one-byte length).
pub const ENTITY_NAME_LEN_MAX: usize = 255;
/// The longest entity key accepted, in bytes (it is stored with a two-byte length).
pub const ENTITY_KEY_LEN_MAX: usize = 1024;
/// The longest message id accepted, in bytes.
pub const MESSAGE_ID_LEN_MAX: usize = 255;

/// Writes `space ++ entity prefix` for `(entity, key)`.
///
/// The caller has validated both lengths; the asserts guard the invariant that makes the
/// layout prefix-free.
pub(crate) fn entity_prefix(space: Space, entity: &str, key: &str) -> Vec<u8> {
    assert!(
        entity.len() <= ENTITY_NAME_LEN_MAX,
        "entity names are validated at registration"
    );
    assert!(
        key.len() <= ENTITY_KEY_LEN_MAX,
        "keys are validated before they reach storage"
    );
    let mut out = Vec::with_capacity(4 + entity.len() + key.len() + 16);
    out.push(space as u8);
    out.push(entity.len() as u8);
    out.extend_from_slice(entity.as_bytes());
    out.extend_from_slice(&(key.len() as u16).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// The key of an entity's state record.
pub(crate) fn state(entity: &str, key: &str) -> Vec<u8> {
    entity_prefix(Space::State, entity, key)
}

/// The key of a dedup record for one message id of one entity.
pub(crate) fn dedup(entity: &str, key: &str, message_id: &str) -> Vec<u8> {
    let mut out = entity_prefix(Space::Dedup, entity, key);
    out.extend_from_slice(message_id.as_bytes());
    out
}

/// The key of an inbox entry in the `Normal` lane; `seq` orders one entity's entries.
#[cfg(test)]
pub(crate) fn inbox(entity: &str, key: &str, seq: u64) -> Vec<u8> {
    inbox_in(entity, key, seq, Priority::Normal)
}

/// The key of an inbox entry in lane `lane`. The lane follows the sequence, so one entity's
/// entries stay in sequence order whatever their lanes.
pub(crate) fn inbox_in(entity: &str, key: &str, seq: u64, lane: Priority) -> Vec<u8> {
    let mut out = entity_prefix(Space::Inbox, entity, key);
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(lane.index() as u8);
    out
}

/// The lane of an inbox suffix: its ninth byte, or `Normal` for an entry written before
/// lanes existed (eight bytes). `None` for a suffix of another length or an unknown lane.
pub(crate) fn inbox_lane(suffix: &[u8]) -> Option<Priority> {
    match suffix.len() {
        8 => Some(Priority::Normal),
        9 => Priority::from_index(suffix[8]),
        _ => None,
    }
}

/// The prefix of shard `shard`'s lane `lane` in the lane index.
pub(crate) fn lane_index_prefix(shard: usize, lane: Priority) -> Vec<u8> {
    let shard = u16::try_from(shard).expect("shards are at most 1024");
    let mut out = vec![Space::LaneIndex as u8];
    out.extend_from_slice(&shard.to_be_bytes());
    out.push(lane.index() as u8);
    out
}

/// The lane index entry of the inbox entry with sequence `seq`.
pub(crate) fn lane_index(shard: usize, lane: Priority, seq: u64) -> Vec<u8> {
    let mut out = lane_index_prefix(shard, lane);
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

/// The prefix of lane `lane` in the outbox lane index.
pub(crate) fn outbox_index_prefix(lane: Priority) -> Vec<u8> {
    vec![Space::OutboxIndex as u8, lane.index() as u8]
}

/// The outbox lane index entry, in lane `lane`, of effect `index` of the message committed
/// with outbox sequence `seq`.
pub(crate) fn outbox_index(lane: Priority, seq: u64, index: u32) -> Vec<u8> {
    let mut out = outbox_index_prefix(lane);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out
}

/// The sequence and effect index of an outbox (or history) suffix, with or without its
/// lane byte.
pub(crate) fn outbox_position(suffix: &[u8]) -> Option<(u64, u32)> {
    if suffix.len() != 12 && suffix.len() != 13 {
        return None;
    }
    let seq = u64::from_be_bytes(suffix[..8].try_into().ok()?);
    let index = u32::from_be_bytes(suffix[8..12].try_into().ok()?);
    Some((seq, index))
}

/// The key of an entity's raise record (see `RaiseRecord`).
pub(crate) fn raise(entity: &str, key: &str) -> Vec<u8> {
    entity_prefix(Space::Raise, entity, key)
}

/// The key of a delayed message due at `due_ms`: timers sort by due time, then by their
/// acceptance sequence, so the next one due is the first key of the keyspace.
pub(crate) fn timer(due_ms: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    out.push(Space::Timer as u8);
    out.extend_from_slice(&due_ms.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

/// The due time and sequence of a timer key; `None` for a malformed one.
pub(crate) fn timer_position(key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 17 || key[0] != Space::Timer as u8 {
        return None;
    }
    let due = u64::from_be_bytes(key[1..9].try_into().ok()?);
    let seq = u64::from_be_bytes(key[9..17].try_into().ok()?);
    Some((due, seq))
}

/// The key under which entity (`entity`, `key`)'s delayed message `message_id` is found.
pub(crate) fn timer_id(entity: &str, key: &str, message_id: &str) -> Vec<u8> {
    let mut out = entity_prefix(Space::TimerId, entity, key);
    out.extend_from_slice(message_id.as_bytes());
    out
}

/// The key of schedule `name`.
pub(crate) fn schedule(name: &str) -> Vec<u8> {
    let mut out = vec![Space::Schedule as u8];
    out.extend_from_slice(name.as_bytes());
    out
}

/// The key of a shed message.
pub(crate) fn shed(entity: &str, key: &str, message_id: &str) -> Vec<u8> {
    let mut out = entity_prefix(Space::Shed, entity, key);
    out.extend_from_slice(message_id.as_bytes());
    out
}

/// The key of a dead letter.
pub(crate) fn dead_letter(entity: &str, key: &str, message_id: &str) -> Vec<u8> {
    let mut out = entity_prefix(Space::DeadLetter, entity, key);
    out.extend_from_slice(message_id.as_bytes());
    out
}

/// The key of a meta record.
/// The listing index entry of entity (`entity`, `key`): `E ++ len(entity) ++ entity ++ key`,
/// so one type's keys sort in plain byte order and a key prefix is a key-space prefix.
pub(crate) fn entity_index(entity: &str, key: &str) -> Vec<u8> {
    let mut out = entity_index_prefix(entity, key);
    out.shrink_to_fit();
    out
}

/// The listing index prefix of entity type `entity` and keys starting with `key_prefix`.
pub(crate) fn entity_index_prefix(entity: &str, key_prefix: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + entity.len() + key_prefix.len());
    out.push(Space::EntityIndex as u8);
    out.push(u8::try_from(entity.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(entity.as_bytes());
    out.extend_from_slice(key_prefix.as_bytes());
    out
}

/// The key of a listing index entry of entity type `entity`, if `bytes` is one.
pub(crate) fn entity_index_key<'a>(entity: &str, bytes: &'a [u8]) -> Option<&'a str> {
    let head = entity_index_prefix(entity, "");
    bytes
        .strip_prefix(head.as_slice())
        .and_then(|key| std::str::from_utf8(key).ok())
}

/// The change feed segment whose last record has sequence `seq` (a segment holds the
/// records of one committed batch; a scan from `feed(p + 1)` finds the segment holding
/// record `p + 1` first).
pub(crate) fn feed(seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.push(Space::Feed as u8);
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

/// The sequence of a change feed key.
pub(crate) fn feed_seq(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(&[Space::Feed as u8])?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// The record of change feed consumer `name`.
pub(crate) fn feed_consumer(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + name.len());
    out.push(Space::FeedConsumer as u8);
    out.extend_from_slice(name.as_bytes());
    out
}

pub(crate) fn meta(name: &str) -> Vec<u8> {
    let mut out = vec![Space::Meta as u8];
    out.extend_from_slice(name.as_bytes());
    out
}

/// A key split back into its parts. Borrowed from the key bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed<'a> {
    pub entity: &'a str,
    pub key: &'a str,
    pub suffix: &'a [u8],
}

/// Splits a key of `space` into entity, key and suffix; `None` when the bytes are not a
/// well-formed key of that keyspace (never panics on arbitrary bytes).
pub(crate) fn parse(space: Space, bytes: &[u8]) -> Option<Parsed<'_>> {
    let (&lead, rest) = bytes.split_first()?;
    if lead != space as u8 {
        return None;
    }
    let (&name_len, rest) = rest.split_first()?;
    let name_len = usize::from(name_len);
    if rest.len() < name_len + 2 {
        return None;
    }
    let (entity, rest) = rest.split_at(name_len);
    let (key_len, rest) = rest.split_at(2);
    let key_len = usize::from(u16::from_be_bytes([key_len[0], key_len[1]]));
    if rest.len() < key_len {
        return None;
    }
    let (key, suffix) = rest.split_at(key_len);
    Some(Parsed {
        entity: std::str::from_utf8(entity).ok()?,
        key: std::str::from_utf8(key).ok()?,
        suffix,
    })
}

/// Reads an inbox suffix back as its sequence number (with or without its lane byte).
pub(crate) fn inbox_seq(suffix: &[u8]) -> Option<u64> {
    inbox_lane(suffix)?;
    let bytes: [u8; 8] = suffix.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_entity_is_contiguous_and_ordered() {
        let a1 = inbox("order", "a", 1);
        let a2 = inbox("order", "a", 2);
        let ab = inbox("order", "ab", 0);
        let prefix = entity_prefix(Space::Inbox, "order", "a");
        assert!(a1.starts_with(&prefix) && a2.starts_with(&prefix));
        assert!(
            !ab.starts_with(&prefix),
            "key 'ab' must not fall under key 'a'"
        );
        assert!(a1 < a2, "sequence orders one entity's inbox");
    }

    proptest! {
        #[test]
        fn parse_inverts_the_layout(entity in "[a-z]{1,20}", key in ".{0,60}", seq in any::<u64>()) {
            let bytes = inbox(&entity, &key, seq);
            let parsed = parse(Space::Inbox, &bytes).expect("a key we built parses");
            prop_assert_eq!(parsed.entity, entity.as_str());
            prop_assert_eq!(parsed.key, key.as_str());
            prop_assert_eq!(inbox_seq(parsed.suffix), Some(seq));
        }

        #[test]
        fn an_inbox_key_keeps_its_lane(entity in "[a-z]{1,20}", key in ".{0,60}", seq in any::<u64>(), lane in 0usize..4) {
            let lane = Priority::ALL[lane];
            let bytes = inbox_in(&entity, &key, seq, lane);
            let parsed = parse(Space::Inbox, &bytes).expect("a key we built parses");
            prop_assert_eq!(inbox_seq(parsed.suffix), Some(seq));
            prop_assert_eq!(inbox_lane(parsed.suffix), Some(lane));
            // An entry written before lanes (no lane byte) reads as Normal.
            let mut old = entity_prefix(Space::Inbox, &entity, &key);
            old.extend_from_slice(&seq.to_be_bytes());
            let parsed = parse(Space::Inbox, &old).expect("parses");
            prop_assert_eq!(inbox_seq(parsed.suffix), Some(seq));
            prop_assert_eq!(inbox_lane(parsed.suffix), Some(Priority::Normal));
        }

        #[test]
        fn timers_sort_by_due_time_then_sequence(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            prop_assert_eq!(timer(a.0, a.1).cmp(&timer(b.0, b.1)), a.cmp(&b));
            prop_assert_eq!(timer_position(&timer(a.0, a.1)), Some(a));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(Space::Inbox, &bytes);
            let _ = parse(Space::Dedup, &bytes);
        }
    }
}
