//! The one message `bulwark-hook` sends, written without serde.

/// A libvirt hook event for a protected domain: `{"op":"hook",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HookEvent {
    pub domain: String,
    /// The domain's UUID: the agent's record of it is keyed by this.
    pub uuid: String,
    /// libvirt's operation and sub-operation, e.g. `prepare begin`.
    pub event: String,
    /// Bulwark's bitmaps were flagged in use at start: the domain was not
    /// stopped cleanly, so its next backup must read everything.
    #[cfg_attr(feature = "serde", serde(default))]
    pub unclean: bool,
    /// Targets (`vda`, ...) of the disks the hook gave a bitmap.
    #[cfg_attr(feature = "serde", serde(default))]
    pub bitmaps_added: Vec<String>,
}

impl HookEvent {
    /// The request line, newline included, exactly as serde would read it
    /// into `Request::Hook`: the hook stays std-only.
    pub fn to_json_line(&self) -> String {
        let mut o = String::with_capacity(128);
        o.push_str("{\"op\":\"hook\",\"domain\":");
        json_str(&mut o, &self.domain);
        o.push_str(",\"uuid\":");
        json_str(&mut o, &self.uuid);
        o.push_str(",\"event\":");
        json_str(&mut o, &self.event);
        o.push_str(",\"unclean\":");
        o.push_str(if self.unclean { "true" } else { "false" });
        o.push_str(",\"bitmaps_added\":[");
        for (i, b) in self.bitmaps_added.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            json_str(&mut o, b);
        }
        o.push_str("]}\n");
        o
    }
}

/// Appends `s` as a JSON string: quotes and backslashes escaped, control
/// characters as `\u00XX` (domain names and paths come from outside).
fn json_str(o: &mut String, s: &str) {
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let n = c as usize;
                o.push_str("\\u00");
                o.push(HEX[n >> 4] as char);
                o.push(HEX[n & 0xf] as char);
            }
            c => o.push(c),
        }
    }
    o.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(s: &str) -> String {
        let mut o = String::new();
        json_str(&mut o, s);
        o
    }

    #[test]
    fn escapes_strings() {
        assert_eq!(quoted("a\"b\n"), "\"a\\\"b\\u000a\"");
        assert_eq!(quoted("a\\b"), "\"a\\\\b\"");
        assert_eq!(quoted("\u{1f}\u{0}é"), "\"\\u001f\\u0000é\"");
        let line = HookEvent::default().to_json_line();
        assert_eq!(
            line,
            "{\"op\":\"hook\",\"domain\":\"\",\"uuid\":\"\",\"event\":\"\",\
             \"unclean\":false,\"bitmaps_added\":[]}\n"
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_reads_the_hand_written_line_as_a_hook_request() {
        use crate::Request;
        let awkward = "q\"uote b\\ack\\\\slash \n\r\t\u{0}\u{1}\u{1f}\u{7f} é ✓ 🦀 </>&'";
        let events = [
            HookEvent::default(),
            HookEvent {
                domain: "web-1".into(),
                uuid: "0b3c8a58-5b43-4a7e-9d1e-2f2d6c1f0e11".into(),
                event: "prepare begin".into(),
                unclean: true,
                bitmaps_added: vec!["vda".into(), "sdb".into()],
            },
            HookEvent {
                domain: awkward.into(),
                uuid: format!("{awkward}-uuid"),
                event: format!("release {awkward}"),
                unclean: false,
                bitmaps_added: vec![awkward.into(), String::new(), "\\".into(), "\"".into()],
            },
        ];
        for ev in events {
            let line = ev.to_json_line();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            let got: Request =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(got, Request::Hook(ev.clone()), "{line}");
            // And it is the very object serde itself would write.
            let ours: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(ours, serde_json::to_value(Request::Hook(ev)).unwrap());
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn reads_a_hook_line_without_the_optional_fields() {
        let got: crate::Request = serde_json::from_str(
            r#"{"op":"hook","domain":"d","uuid":"u","event":"started begin"}"#,
        )
        .unwrap();
        assert_eq!(
            got,
            crate::Request::Hook(HookEvent {
                domain: "d".into(),
                uuid: "u".into(),
                event: "started begin".into(),
                ..Default::default()
            })
        );
    }
}
