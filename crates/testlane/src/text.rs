//! Pure text helpers: shell quoting, base64, and the marker protocols used
//! with the L1 agent and with the L2 serial shell.

/// Quotes `word` for a POSIX shell: single quotes, with each embedded single
/// quote written as `'\''`.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Standard base64 (RFC 4648) with padding and no line breaks, which is what
/// the L1 agent's `base64 -d` reads.
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The line the L1 agent prints once it listens on its port.
pub const AGENT_HELLO: &str = "__TIDEVM_AGENT_HELLO__";

/// A request line for the L1 agent (see guest/build-l1.sh).
pub fn agent_request(id: u64, timeout_secs: u64, script: &str) -> String {
    format!("{id} {timeout_secs} {}\n", base64_encode(script.as_bytes()))
}

/// A complete reply of the L1 agent found in a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct AgentReply {
    pub exit_code: i32,
    pub output: String,
    /// Bytes of the buffer up to and including the reply; the caller drops
    /// them (along with any stale replies before it).
    pub consumed: usize,
}

/// Finds the reply to request `id` in `buffer`. The agent frames the output
/// as `__TIDEVM_BEGIN_<id>__\n<output>\n__TIDEVM_END_<id>_<rc>__\n`; the
/// newline before the end marker is the agent's, not the command's.
pub fn parse_agent_reply(buffer: &[u8], id: u64) -> Option<AgentReply> {
    let text = String::from_utf8_lossy(buffer);
    let begin = format!("__TIDEVM_BEGIN_{id}__\n");
    let end = format!("\n__TIDEVM_END_{id}_");
    let begin_at = text.find(&begin)?;
    let body_start = begin_at + begin.len();
    let end_at = body_start + text[body_start..].find(&end)?;
    let after = &text[end_at + end.len()..];
    let digits_len = after
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'-')
        .count();
    let rest = &after[digits_len..];
    if !rest.starts_with("__\n") {
        return None;
    }
    let exit_code = after[..digits_len].parse().ok()?;
    let consumed_text = end_at + end.len() + digits_len + 3;
    // The lossy conversion may have changed lengths; map back only when it
    // did not (the agent's output is expected to be mostly UTF-8).
    let consumed = if text.len() == buffer.len() {
        consumed_text
    } else {
        buffer.len()
    };
    Some(AgentReply {
        exit_code,
        output: text[body_start..end_at].to_string(),
        consumed,
    })
}

/// Marker words used around a command typed into the L2 serial shell.
fn guest_markers(n: u64) -> (String, String) {
    (format!("__TV_S_{n}__"), format!("__TV_E_{n}_"))
}

/// The line to type into the L2 shell to run `command` as request `n`.
///
/// The markers are printed by `echo` with the marker word split by an empty
/// quoted string (`"__TV_S""_7__"`), so the typed line that the tty echoes
/// back never contains the marker itself; only the command's output does.
pub fn guest_command_line(n: u64, command: &str) -> String {
    format!("echo \"__TV_S\"\"_{n}__\"; {command}; echo \"__TV_E\"\"_{n}_$?__\"")
}

/// The text that shows in the console when request `n` has finished.
pub fn guest_end_marker(n: u64) -> String {
    guest_markers(n).1
}

/// Extracts the output and exit status of request `n` from console text.
/// Carriage returns from the tty are dropped; output is the text between the
/// start-marker line and the end-marker line.
pub fn extract_guest_output(console: &str, n: u64) -> Option<(i32, String)> {
    let (start, end) = guest_markers(n);
    let console = console.replace('\r', "");
    let mut output: Option<Vec<&str>> = None;
    for line in console.split('\n') {
        match output.as_mut() {
            None => {
                // The typed line never holds the marker itself, so any line
                // ending in it is the output of the first echo.
                if line.trim_end().ends_with(&start) {
                    output = Some(Vec::new());
                }
            }
            Some(lines) => {
                if let Some(pos) = line.find(&end) {
                    let tail = &line[pos + end.len()..];
                    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
                    if !digits.is_empty() && tail[digits.len()..].starts_with("__") {
                        // Output without a final newline shares the line with
                        // the end marker.
                        if pos > 0 {
                            lines.push(&line[..pos]);
                        }
                        return Some((digits.parse().ok()?, lines.join("\n")));
                    }
                }
                lines.push(line);
            }
        }
    }
    None
}

/// Parses `ldd` output into the shared objects a binary loads (absolute
/// paths only: the vDSO has none).
pub fn parse_ldd(output: &str) -> Vec<String> {
    let mut libraries = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') && !libraries.iter().any(|l| l == path) {
            libraries.push(path.to_string());
        }
    }
    libraries
}

/// Reads the `VmRSS` value (KiB) from a `/proc/PID/status` text.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// True if a `/proc/cpuinfo` text shows hardware virtualization (Intel VT-x
/// `vmx` or AMD-V `svm` in a flags line).
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The last `lines` lines of `text`.
pub fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("abc/d-e.f"), "abc/d-e.f");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$x"), "'$x'");
    }

    #[test]
    fn encodes_base64() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn parses_agent_replies() {
        let buffer = b"__TIDEVM_AGENT_HELLO__\n__TIDEVM_BEGIN_3__\nstale\n__TIDEVM_END_3_0__\n\
__TIDEVM_BEGIN_4__\nhello\nworld\n\n__TIDEVM_END_4_7__\nnext";
        assert_eq!(parse_agent_reply(buffer, 5), None);
        let reply = parse_agent_reply(buffer, 4).unwrap();
        assert_eq!(reply.exit_code, 7);
        assert_eq!(reply.output, "hello\nworld\n");
        assert_eq!(&buffer[reply.consumed..], b"next");
    }

    #[test]
    fn agent_reply_waits_for_the_whole_end_marker() {
        assert_eq!(
            parse_agent_reply(b"__TIDEVM_BEGIN_1__\nx\n__TIDEVM_END_1_1", 1),
            None
        );
        assert_eq!(parse_agent_reply(b"__TIDEVM_BEGIN_1__\nx\n", 1), None);
        let reply = parse_agent_reply(b"__TIDEVM_BEGIN_1__\n\n__TIDEVM_END_1_0__\n", 1).unwrap();
        assert_eq!(reply.output, "");
        assert_eq!(reply.exit_code, 0);
    }

    #[test]
    fn agent_request_is_one_line() {
        let request = agent_request(9, 30, "echo a\necho b");
        assert!(request.starts_with("9 30 "));
        assert_eq!(request.matches('\n').count(), 1);
    }

    #[test]
    fn extracts_guest_output_despite_echo() {
        let typed = guest_command_line(12, "head -1 /proc/meminfo");
        // What the console shows: prompt, the echoed typed line (wrapped by
        // the tty), the output, and the next prompt.
        let console = format!(
            "tidevm-guest# \x1b[6n{typed}\r\n__TV_S_12__\r\nMemTotal:  990352 kB\r\n\
__TV_E_12_0__\r\ntidevm-guest# "
        );
        assert!(!typed.contains("__TV_S_12__"));
        assert!(!typed.contains(&guest_end_marker(12)));
        assert_eq!(
            extract_guest_output(&console, 12),
            Some((0, "MemTotal:  990352 kB".to_string()))
        );
        assert_eq!(extract_guest_output(&console, 13), None);
    }

    #[test]
    fn extracts_exit_status_and_unterminated_output() {
        let console = "__TV_S_2__\r\nno newline__TV_E_2_1__\r\n";
        assert_eq!(
            extract_guest_output(console, 2),
            Some((1, "no newline".to_string()))
        );
        let console = "__TV_S_3__\r\n__TV_E_3_127__\r\n";
        assert_eq!(extract_guest_output(console, 3), Some((127, String::new())));
        // Not finished yet.
        assert_eq!(extract_guest_output("__TV_S_4__\r\npartial", 4), None);
        // Request 1 is not confused with request 10.
        let console = "__TV_S_10__\nten\n__TV_E_10_0__\n";
        assert_eq!(extract_guest_output(console, 1), None);
    }

    #[test]
    fn parses_ldd_output() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd)\n\
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(output),
            vec![
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\ttidevm\nVmPeak:\t 1000 kB\nVmRSS:\t   52344 kB\n";
        assert_eq!(parse_vm_rss_kib(status), Some(52344));
        assert_eq!(parse_vm_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn detects_hardware_virtualization() {
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu svm\n"));
        assert!(!cpuinfo_has_hw_virt("flags\t\t: fpu svmx hypervisor\n"));
        assert!(!cpuinfo_has_hw_virt("model name: svm vmx\n"));
    }
}
