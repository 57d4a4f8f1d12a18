//! The stored format: a format-version byte followed by the bincode 2 (serde) encoding.
//!
//! Every value keystead writes to disk goes through [`encode`] and comes back through
//! [`decode`], so a later release can recognise old records by their first byte and migrate
//! them. Decoding never panics: unknown versions, truncated input and trailing garbage are all
//! reported as a [`DecodeError`].
//!
//! Stored types must round-trip through bincode: avoid `#[serde(flatten)]`, `#[serde(skip)]`
//! and untagged enums in them (bincode is not self-describing and cannot decode those).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::DecodeError;

/// The version byte that prefixes every stored value written by this release.
pub const FORMAT_VERSION: u8 = 1;

/// The most bytes one stored value may take, encoded, and may claim while it is decoded.
/// A corrupt length prefix can claim any size; without this cap bincode would try to
/// allocate it and abort the process (found by `tests/errors_arbitrary_bytes.rs`).
pub(crate) const RECORD_BYTES_MAX: usize = 64 << 20;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<RECORD_BYTES_MAX>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<RECORD_BYTES_MAX>()
}

/// Encodes `value` as `[FORMAT_VERSION] ++ bincode(value)`.
///
/// # Errors
/// Returns the serializer's message when the value cannot be encoded (for example a map with
/// non-string keys is fine, but a type whose `Serialize` impl itself fails is not).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut bytes, config())
        .map_err(|e| e.to_string())?;
    if bytes.len() > RECORD_BYTES_MAX {
        return Err(format!(
            "the encoded value is {} bytes, over keystead's limit of {RECORD_BYTES_MAX} bytes per stored record; keep large data outside and store a reference",
            bytes.len()
        ));
    }
    debug_assert_eq!(
        bytes[0], FORMAT_VERSION,
        "the version byte leads every record"
    );
    Ok(bytes)
}

/// Decodes bytes written by [`encode`]; `what` names the record kind in the error.
///
/// # Errors
/// [`DecodeError`] when the bytes are empty, carry an unknown format version, do not decode as
/// `T`, or have bytes left over after `T`.
pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let (value, extra) = decode_leading(what, bytes)?;
    if extra > 0 {
        return Err(DecodeError::TrailingBytes { what, extra });
    }
    Ok(value)
}

/// Decodes the leading `T` of bytes written by [`encode`] for a larger value whose first
/// fields are `T`'s (a state record's header without its state); the rest is not read.
///
/// # Errors
/// As [`decode`], except that bytes left over are expected.
pub(crate) fn decode_head<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    decode_leading(what, bytes).map(|(value, _)| value)
}

/// The leading `T` of `bytes` (after the format version), and how many bytes follow it.
fn decode_leading<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<(T, usize), DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty { what })?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownFormat {
            what,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| DecodeError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    Ok((value, body.len() - used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Regression: a corrupt length prefix claiming exabytes made bincode abort the process
    /// on allocation failure. It must be a `Malformed` error.
    #[test]
    fn a_huge_claimed_length_is_an_error_not_an_abort() {
        let mut bytes = vec![FORMAT_VERSION];
        // varint: 0xFD = the next 8 bytes hold a u64 length.
        bytes.push(0xFD);
        bytes.extend_from_slice(&0x3FF6_0000_0000_0000u64.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        let err = decode::<String>("test", &bytes).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        let err = decode::<Vec<String>>("test", &bytes).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        id: u64,
        name: String,
        tags: Vec<String>,
        maybe: Option<i32>,
    }

    proptest! {
        #[test]
        fn round_trips(id in any::<u64>(), name in ".{0,40}", tags in proptest::collection::vec(".{0,8}", 0..5), maybe in any::<Option<i32>>()) {
            let value = Sample { id, name, tags, maybe };
            let bytes = encode(&value).expect("a plain struct encodes");
            prop_assert_eq!(bytes[0], FORMAT_VERSION);
            let back: Sample = decode("sample", &bytes).expect("what we wrote decodes");
            prop_assert_eq!(back, value);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            // Any outcome is fine except a panic; errors must name the record kind.
            if let Err(e) = decode::<Sample>("sample", &bytes) {
                prop_assert!(e.to_string().contains("sample"));
            }
        }
    }

    #[test]
    fn rejects_unknown_version_and_trailing_bytes() {
        let mut bytes = encode(&7u64).expect("u64 encodes");
        bytes[0] = 9;
        assert!(matches!(
            decode::<u64>("n", &bytes),
            Err(DecodeError::UnknownFormat { found: 9, .. })
        ));
        let mut bytes = encode(&7u64).expect("u64 encodes");
        bytes.push(0);
        assert!(matches!(
            decode::<u64>("n", &bytes),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
        assert!(matches!(
            decode::<u64>("n", &[]),
            Err(DecodeError::Empty { .. })
        ));
    }
}
