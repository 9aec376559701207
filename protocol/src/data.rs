//! Byte payloads (file contents, process output, stdin) in JSON.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Arbitrary bytes. On the wire: a plain JSON string when the bytes are valid UTF-8 (the common
/// case: command output, /proc files), otherwise `{"base64": "..."}` so nothing is lost or
/// silently replaced.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Data(pub Vec<u8>);

impl Data {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The bytes as text, with invalid UTF-8 sequences replaced (for display only).
    pub fn to_string_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

impl From<Vec<u8>> for Data {
    fn from(bytes: Vec<u8>) -> Self {
        Data(bytes)
    }
}

impl From<&[u8]> for Data {
    fn from(bytes: &[u8]) -> Self {
        Data(bytes.to_vec())
    }
}

impl From<&str> for Data {
    fn from(text: &str) -> Self {
        Data(text.as_bytes().to_vec())
    }
}

impl From<String> for Data {
    fn from(text: String) -> Self {
        Data(text.into_bytes())
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Data({:?})", self.to_string_lossy())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum DataRepr {
    Text(String),
    Binary(Base64Repr),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Base64Repr {
    base64: String,
}

impl Serialize for Data {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                Base64Repr { base64: base64::engine::general_purpose::STANDARD.encode(&self.0) }
                    .serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match DataRepr::deserialize(deserializer)? {
            DataRepr::Text(text) => Ok(Data(text.into_bytes())),
            DataRepr::Binary(Base64Repr { base64 }) => base64::engine::general_purpose::STANDARD
                .decode(base64.as_bytes())
                .map(Data)
                .map_err(|e| serde::de::Error::custom(format!("invalid base64 data: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_a_plain_json_string() {
        let json = serde_json::to_string(&Data::from("a\tb\n")).unwrap();
        assert_eq!(json, r#""a\tb\n""#);
        let back: Data = serde_json::from_str(&json).unwrap();
        assert_eq!(back.as_bytes(), b"a\tb\n");
    }

    #[test]
    fn invalid_utf8_round_trips_through_base64() {
        let bytes = vec![0xff, 0x00, 0xfe, b'x'];
        let json = serde_json::to_string(&Data(bytes.clone())).unwrap();
        assert_eq!(json, r#"{"base64":"/wD+eA=="}"#);
        let back: Data = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0, bytes);
    }

    #[test]
    fn bad_base64_and_other_shapes_are_rejected() {
        assert!(serde_json::from_str::<Data>(r#"{"base64":"!!"}"#).is_err());
        assert!(serde_json::from_str::<Data>(r#"{"base64":"AA==","x":1}"#).is_err());
        assert!(serde_json::from_str::<Data>("[1,2]").is_err());
        assert!(serde_json::from_str::<Data>("12").is_err());
    }
}
