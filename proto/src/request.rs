//! What a client may ask the agent.

use crate::HookEvent;

/// One request, one line on the socket: `{"op":"ping"}`, `{"op":"status"}`,
/// `{"op":"backup","domain":D,"policy":P,"full":false}`,
/// `{"op":"hook",...}` (see [`HookEvent`]), `{"op":"live_adopt","name":N}`.
///
/// An unknown `op`, or a known one missing a field it needs, does not
/// parse: the agent refuses it as a bad request rather than guess.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "op", rename_all = "snake_case"))]
pub enum Request {
    /// Is an agent there? Answered with [`crate::Pong`].
    Ping,
    /// Everything the agent knows (answered with its status document).
    Status,
    /// Back up `domain` now, under `policy` (default: the first of the
    /// domain's policies the agent knows); answered when done, with the
    /// report in [`crate::Backed`].
    Backup {
        domain: String,
        #[cfg_attr(feature = "serde", serde(default))]
        policy: Option<String>,
        #[cfg_attr(feature = "serde", serde(default))]
        full: bool,
    },
    /// A libvirt hook event from `bulwark-hook`, answered at once.
    Hook(HookEvent),
    /// Take over the supervision of live restore `name`.
    LiveAdopt { name: String },
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<Request, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn reads_what_clients_send_today() {
        assert_eq!(parse(json!({"op": "ping"})).unwrap(), Request::Ping);
        assert_eq!(parse(json!({"op": "status"})).unwrap(), Request::Status);
        assert_eq!(
            parse(json!({"op": "backup", "domain": "vm1", "policy": null, "full": false})).unwrap(),
            Request::Backup {
                domain: "vm1".into(),
                policy: None,
                full: false
            }
        );
        assert_eq!(
            parse(json!({"op": "backup", "domain": "vm1", "policy": "daily", "full": true}))
                .unwrap(),
            Request::Backup {
                domain: "vm1".into(),
                policy: Some("daily".into()),
                full: true
            }
        );
        // policy and full may be left out.
        assert_eq!(
            parse(json!({"op": "backup", "domain": "vm1"})).unwrap(),
            Request::Backup {
                domain: "vm1".into(),
                policy: None,
                full: false
            }
        );
        assert_eq!(
            parse(json!({"op": "live_adopt", "name": "r1"})).unwrap(),
            Request::LiveAdopt { name: "r1".into() }
        );
    }

    #[test]
    fn writes_what_the_agent_reads() {
        let b = Request::Backup {
            domain: "vm1".into(),
            policy: None,
            full: true,
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            json!({"op": "backup", "domain": "vm1", "policy": null, "full": true})
        );
        assert_eq!(
            serde_json::to_value(Request::LiveAdopt { name: "r".into() }).unwrap(),
            json!({"op": "live_adopt", "name": "r"})
        );
        for r in [Request::Ping, Request::Status, b] {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        }
    }

    #[test]
    fn refuses_unknown_ops_and_missing_fields() {
        let e = parse(json!({"op": "format_disk"})).unwrap_err().to_string();
        assert!(e.contains("unknown variant `format_disk`"), "{e}");
        let e = parse(json!({"domain": "vm1"})).unwrap_err().to_string();
        assert!(e.contains("missing field `op`"), "{e}");
        let e = parse(json!({"op": "backup"})).unwrap_err().to_string();
        assert!(e.contains("missing field `domain`"), "{e}");
        let e = parse(json!({"op": "live_adopt"})).unwrap_err().to_string();
        assert!(e.contains("missing field `name`"), "{e}");
        assert!(parse(json!({"op": "backup", "domain": 7})).is_err());
    }
}
