//! The agent's answers: `{"ok":true,...payload}` or
//! `{"ok":false,"error":"..."}`, one line.

use std::fmt;

/// An answer to one [`crate::Request`]. On the wire the payload's fields
/// sit beside `"ok":true` (so `T` must serialize as an object: a struct or
/// a map), which is what scripts reading the socket have always seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<T> {
    Ok(T),
    /// Refused or failed: the agent's reason.
    Err {
        error: String,
    },
}

impl<T> Reply<T> {
    /// A failure, in the agent's words.
    pub fn err(error: impl fmt::Display) -> Self {
        Reply::Err {
            error: error.to_string(),
        }
    }

    /// The payload, or the agent's reason as an error.
    pub fn into_result(self) -> Result<T, Refused> {
        match self {
            Reply::Ok(t) => Ok(t),
            Reply::Err { error } => Err(Refused { error }),
        }
    }
}

/// The agent said no (or tried and failed); `error` is its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub error: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)
    }
}

impl std::error::Error for Refused {}

/// The answer to `ping`: `{"ok":true,"version":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Pong {
    /// The agent's package version.
    pub version: String,
}

/// An answer that carries nothing but success: `{"ok":true}` (`hook`,
/// `live_adopt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Done {}

/// The answer to `backup`: `{"ok":true,"report":{...}}`. The report's type
/// is the agent's own (this crate does not know backups); a client that
/// only shows it may read it as any JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Backed<R> {
    pub report: R,
}

#[cfg(feature = "serde")]
mod wire {
    use super::Reply;
    use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    struct OkOut<'a, T> {
        ok: bool,
        #[serde(flatten)]
        payload: &'a T,
    }

    #[derive(Serialize)]
    struct ErrOut<'a> {
        ok: bool,
        error: &'a str,
    }

    impl<T: Serialize> Serialize for Reply<T> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self {
                Reply::Ok(payload) => OkOut { ok: true, payload }.serialize(s),
                Reply::Err { error } => ErrOut { ok: false, error }.serialize(s),
            }
        }
    }

    /// Every field at once: `ok` decides which of the others count. A
    /// payload that does not parse reads as `None` (serde's rule for a
    /// flattened `Option`), which only matters when `ok` is true.
    #[derive(Deserialize)]
    struct In<T> {
        ok: bool,
        #[serde(default)]
        error: Option<String>,
        #[serde(flatten)]
        payload: Option<T>,
    }

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Reply<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let r = In::<T>::deserialize(d)?;
            match (r.ok, r.payload) {
                (true, Some(p)) => Ok(Reply::Ok(p)),
                (true, None) => Err(de::Error::custom(
                    "a successful reply without the payload this request expects",
                )),
                (false, _) => Ok(Reply::Err {
                    error: r
                        .error
                        .unwrap_or_else(|| "failed (the agent gave no reason)".into()),
                }),
            }
        }
    }
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn out<T: serde::Serialize>(r: &Reply<T>) -> Value {
        // Through the text, as on the socket.
        serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap()
    }

    fn back<T: serde::de::DeserializeOwned>(v: Value) -> Result<Reply<T>, serde_json::Error> {
        serde_json::from_str(&v.to_string())
    }

    #[test]
    fn writes_todays_replies() {
        let pong = Reply::Ok(Pong {
            version: "0.1.0".into(),
        });
        assert_eq!(out(&pong), json!({"ok": true, "version": "0.1.0"}));
        assert_eq!(out(&Reply::Ok(Done {})), json!({"ok": true}));
        assert_eq!(
            out(&Reply::Ok(Backed {
                report: json!({"mode": "full", "bytes": 3})
            })),
            json!({"ok": true, "report": {"mode": "full", "bytes": 3}})
        );
        assert_eq!(
            out(&Reply::<Done>::err("no such domain \"x\"")),
            json!({"ok": false, "error": "no such domain \"x\""})
        );
        // A map payload's keys sit beside ok (the status document).
        assert_eq!(
            out(&Reply::Ok(json!({"host": "h", "problems": []}))),
            json!({"ok": true, "host": "h", "problems": []})
        );
        assert!(serde_json::to_string(&Reply::Ok(Done {}))
            .unwrap()
            .starts_with("{\"ok\":true"));
    }

    #[test]
    fn reads_them_back() {
        let pong = Reply::Ok(Pong {
            version: "1".into(),
        });
        assert_eq!(back::<Pong>(out(&pong)).unwrap(), pong);
        assert_eq!(
            back::<Done>(json!({"ok": true})).unwrap(),
            Reply::Ok(Done {})
        );
        assert_eq!(
            back::<Backed<Value>>(json!({"ok": true, "report": {"a": 1}})).unwrap(),
            Reply::Ok(Backed {
                report: json!({"a": 1})
            })
        );
        assert_eq!(
            back::<Value>(json!({"ok": true, "host": "h", "runs": {}})).unwrap(),
            Reply::Ok(json!({"host": "h", "runs": {}}))
        );
        // Failures, whatever the payload type, keep the reason.
        let e = back::<Pong>(json!({"ok": false, "error": "bad request: x"})).unwrap();
        assert_eq!(
            e.into_result().unwrap_err().to_string(),
            "bad request: x".to_string()
        );
        let e = back::<Backed<Value>>(json!({"ok": false})).unwrap();
        assert!(matches!(e, Reply::Err { .. }));
    }

    #[test]
    fn refuses_what_is_not_a_reply() {
        assert!(back::<Pong>(json!({"ok": true})).is_err());
        assert!(back::<Backed<Value>>(json!({"ok": true, "error": "x"})).is_err());
        assert!(back::<Done>(json!({"version": "1"})).is_err());
        assert!(back::<Done>(json!({"ok": "yes"})).is_err());
        assert!(back::<Done>(json!([true])).is_err());
    }
}
