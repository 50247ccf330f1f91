//! Dispatch tests: unknown commands, arity and case, subcommand errors,
//! and `denyoom` refusals over `maxmemory`.

use super::test_util::{cmd, new_store};

#[test]
fn unknown_command() {
    let mut s = new_store();
    assert_eq!(
        cmd!(s, "foo", "a", "b"),
        b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"
    );
    assert_eq!(
        cmd!(s, "foo"),
        b"-ERR unknown command 'foo', with args beginning with: \r\n"
    );
    assert_eq!(
        cmd!(s, "x\r\ny"),
        b"-ERR unknown command 'x  y', with args beginning with: \r\n"
    );
    let long = alloc::vec![b'a'; 300];
    let out = cmd!(s, "foo", &long, "b");
    let mut want = b"-ERR unknown command 'foo', with args beginning with: '".to_vec();
    want.extend_from_slice(&[b'a'; 128]);
    want.extend_from_slice(b"' \r\n");
    assert_eq!(out, want);
}

#[test]
fn arity_and_case() {
    let mut s = new_store();
    assert_eq!(
        cmd!(s, "get"),
        b"-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        cmd!(s, "GeT", "a", "b"),
        b"-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        cmd!(s, "set", "a"),
        b"-ERR wrong number of arguments for 'set' command\r\n"
    );
    assert_eq!(cmd!(s, "SET", "a", "b"), b"+OK\r\n");
    assert_eq!(
        cmd!(s, "config"),
        b"-ERR wrong number of arguments for 'config' command\r\n"
    );
    assert_eq!(
        cmd!(s, "config", "get"),
        b"-ERR wrong number of arguments for 'config|get' command\r\n"
    );
    assert_eq!(
        cmd!(s, "config", "bogus"),
        b"-ERR unknown subcommand 'bogus'. Try CONFIG HELP.\r\n"
    );
    assert_eq!(s.stats.total_commands_processed, 1);
    assert_eq!(s.stats.total_error_replies, 6);
}

#[test]
fn denyoom_when_over_limit() {
    let mut s = new_store();
    cmd!(s, "set", "a", "b");
    s.set_maxmemory(1);
    assert_eq!(
        cmd!(s, "set", "x", "y"),
        b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    );
    assert_eq!(cmd!(s, "get", "a"), b"$1\r\nb\r\n");
    assert_eq!(cmd!(s, "del", "a"), b":1\r\n");
}
