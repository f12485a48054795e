//! How text that someone else chose reaches a terminal: a path, a file or
//! source name, a server's error, a node ID. mftd serves several local users
//! and talks to servers it does not trust, so any of these may carry bytes
//! meant to drive the terminal of whoever runs `mftctl` (root included):
//! clear the screen, set the window title, fake a line, reorder a line.
//!
//! Owns the one rule for human-form output: such a character is shown as a
//! visible escape, never written. Must never be used for `--json` output,
//! which stays JSON (see [`crate::display::print_json`]), nor for text
//! already passed through it (a backslash would be doubled twice).
//!
//! | shown as | for |
//! |---|---|
//! | `\\` | a backslash, so every escape below reads one way |
//! | `\e` | ESC (0x1b), which starts terminal control sequences |
//! | `\n` `\r` `\t` | line feed, carriage return, tab: a field stays on its line and in its column |
//! | `\x07` | any other C0 control (0x00–0x1f) and DEL (0x7f) |
//! | `\u{9b}` | C1 controls (U+0080–U+009F; U+009B is CSI to some terminals) |
//! | `\u{202e}` | bidirectional overrides, embeddings, isolates and marks (U+061C, U+200E–U+200F, U+202A–U+202E, U+2066–U+2069), which reorder what a line shows, and the line and paragraph separators U+2028–U+2029 |

use std::fmt::{self, Display};

/// A string as it may be shown on a terminal: every field of a response
/// `mftctl` prints for a person goes through this.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

/// Whether `c` is written as an escape instead of as itself.
pub fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Writes `c` as its escape: `\e`, `\n`, `\x07`, `\u{202e}`.
fn write_escape(f: &mut impl fmt::Write, c: char) -> fmt::Result {
    match c {
        '\u{1b}' => f.write_str("\\e"),
        '\n' => f.write_str("\\n"),
        '\r' => f.write_str("\\r"),
        '\t' => f.write_str("\\t"),
        c if (c as u32) < 0x80 => write!(f, "\\x{:02x}", c as u32),
        c => write!(f, "\\u{{{:x}}}", c as u32),
    }
}

/// Writes `s` with every character [`escaped`] (and `\\`) as its escape.
fn write_shown(f: &mut impl fmt::Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(i) = rest.find(|c: char| c == '\\' || escaped(c)) {
        f.write_str(&rest[..i])?;
        let c = rest[i..].chars().next().unwrap_or_default();
        if c == '\\' {
            f.write_str("\\\\")?;
        } else {
            write_escape(f, c)?;
        }
        rest = &rest[i + c.len_utf8()..];
    }
    f.write_str(rest)
}

impl Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Width and alignment (`{:<24}`) apply to the shown text, as a table
        // column needs: build it first when they are asked for.
        if f.width().is_some() || f.precision().is_some() {
            let mut shown = String::with_capacity(self.0.len());
            write_shown(&mut shown, self.0)?;
            return f.pad(&shown);
        }
        write_shown(f, self.0)
    }
}

/// Shows an optional field, or `none` in its place.
pub fn shown_or<'a>(s: Option<&'a str>, none: &'a str) -> Shown<'a> {
    Shown(s.unwrap_or(none))
}

/// The last guard before text reaches the terminal: every character
/// [`Shown`] escapes, except the line breaks `mftctl` puts between lines
/// itself, is escaped here too. Text built from [`Shown`] fields has none
/// left, so this changes nothing; it catches a field a future change
/// prints without [`Shown`], before its bytes can act on the terminal.
/// (A line feed inside such a field still breaks the line: the unit tests
/// in `display` catch that, by line count.)
pub fn guarded(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && escaped(c)) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c != '\n' && escaped(c) {
            let _ = write_escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// Whether `text` holds a character that would act on a terminal (what
/// [`Shown`] escapes, line feeds aside): for tests.
#[cfg(test)]
pub fn acts_on_terminal(text: &str) -> bool {
    text.chars().any(|c| c != '\n' && escaped(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_shown_as_it_is() {
        for s in ["", "ubuntu.iso", "/tmp/dl/日本語 file.bin", "127.0.0.1:5001", "[::1]:5001", "a%b{c}"] {
            assert_eq!(Shown(s).to_string(), s);
        }
    }

    #[test]
    fn what_drives_a_terminal_is_shown_escaped() {
        let cases = [
            ("x\x1b[2J\x1b[31mFAKE", "x\\e[2J\\e[31mFAKE"),
            ("\x1b]0;owned\x07", "\\e]0;owned\\x07"),
            ("a\nb\rc\td", "a\\nb\\rc\\td"),
            ("bs\x08 del\x7f nul\0", "bs\\x08 del\\x7f nul\\x00"),
            ("csi\u{9b}2J c1\u{80}\u{9f}", "csi\\u{9b}2J c1\\u{80}\\u{9f}"),
            ("evil\u{202e}txt.exe", "evil\\u{202e}txt.exe"),
            (
                "\u{202a}\u{202d}\u{2066}\u{2069}\u{200e}\u{200f}\u{61c}",
                "\\u{202a}\\u{202d}\\u{2066}\\u{2069}\\u{200e}\\u{200f}\\u{61c}",
            ),
            ("line\u{2028}sep", "line\\u{2028}sep"),
        ];
        for (raw, want) in cases {
            let got = Shown(raw).to_string();
            assert_eq!(got, want, "{raw:?}");
            assert!(!acts_on_terminal(&got), "{got:?}");
        }
    }

    #[test]
    fn a_backslash_is_doubled_so_an_escape_reads_one_way() {
        // A name that spells an escape is not shown like the byte it spells.
        assert_eq!(Shown("\\e[2J").to_string(), "\\\\e[2J");
        assert_ne!(Shown("\\e").to_string(), Shown("\x1b").to_string());
        assert_eq!(Shown("C:\\dir\\").to_string(), "C:\\\\dir\\\\");
    }

    #[test]
    fn width_and_alignment_apply_to_what_is_shown() {
        assert_eq!(format!("[{:<6}]", Shown("a\x07")), "[a\\x07 ]");
        assert_eq!(format!("[{:>6}]", Shown("ab")), "[    ab]");
        assert_eq!(format!("[{:<3}]", Shown("abcdef")), "[abcdef]");
    }

    #[test]
    fn the_guard_escapes_what_slipped_through_and_keeps_line_breaks() {
        assert_eq!(guarded("ok\nline two\n"), "ok\nline two\n");
        assert_eq!(guarded("a\x1b[2Jb\t\u{202e}\n"), "a\\e[2Jb\\t\\u{202e}\n");
        // Shown text passes unchanged: nothing is escaped twice.
        let s = Shown("\\x\x1b").to_string();
        assert_eq!(guarded(&s), s);
    }
}
