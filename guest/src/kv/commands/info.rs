//! INFO and its sections (server, clients, memory, stats, keyspace,
//! latency), and PROBE RESET, which clears the latency section's probe.

use alloc::string::String;
use core::fmt::Write;

use super::{spec, Ctx, Spec, NOKEY, REDIS_VERSION};
use crate::kv::resp::Args;

const SECTIONS: [&str; 6] = [
    "server", "clients", "memory", "stats", "keyspace", "latency",
];

/// Redis's `bytesToHuman`.
fn human(out: &mut String, n: usize) {
    let units = [
        (1u64 << 50, 'P'),
        (1 << 40, 'T'),
        (1 << 30, 'G'),
        (1 << 20, 'M'),
        (1 << 10, 'K'),
    ];
    let n = n as u64;
    for (size, u) in units {
        if n >= size {
            let _ = write!(out, "{:.2}{}", n as f64 / size as f64, u);
            return;
        }
    }
    let _ = write!(out, "{n}B");
}

fn write_section(ctx: &Ctx<'_, '_>, name: &str, out: &mut String) {
    let s = &*ctx.store;
    match name {
        "server" => {
            let tpus = ctx.clock.ticks_per_us().max(1);
            let start = s.start_ticks.unwrap_or(0);
            let up = ctx.clock.now_ticks().saturating_sub(start) / tpus / 1_000_000;
            let _ = write!(
                out,
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_git_sha1:00000000\r\nredis_git_dirty:0\r\n\
                 redis_build_id:0\r\nredis_mode:standalone\r\nos:snapvm-guest\r\narch_bits:64\r\n\
                 multiplexing_api:poll\r\nprocess_id:1\r\nrun_id:0000000000000000000000000000000000000000\r\n\
                 tcp_port:6379\r\nuptime_in_seconds:{up}\r\nuptime_in_days:{}\r\nexecutable:/snapvm-guest\r\n\
                 config_file:\r\n",
                up / 86400
            );
        }
        "clients" => {
            let _ = write!(
                out,
                "# Clients\r\nconnected_clients:{}\r\nblocked_clients:0\r\ntracking_clients:0\r\nmaxclients:10000\r\n",
                s.connected_clients()
            );
        }
        "memory" => {
            let _ = write!(
                out,
                "# Memory\r\nused_memory:{}\r\nused_memory_human:",
                s.used_memory()
            );
            human(out, s.used_memory());
            let _ = write!(
                out,
                "\r\nused_memory_peak:{}\r\nused_memory_peak_human:",
                s.peak_memory()
            );
            human(out, s.peak_memory());
            let _ = write!(out, "\r\nmaxmemory:{}\r\nmaxmemory_human:", s.maxmemory());
            human(out, s.maxmemory());
            let _ = write!(
                out,
                "\r\nmaxmemory_policy:noeviction\r\nmem_allocator:snapvm\r\nlazyfree_pending_objects:{}\r\n",
                s.lazyfree_pending_objects()
            );
        }
        "stats" => {
            let st = &s.stats;
            let _ = write!(
                out,
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
                 instantaneous_ops_per_sec:0\r\ntotal_net_input_bytes:{}\r\ntotal_net_output_bytes:{}\r\n\
                 rejected_connections:0\r\nexpired_keys:0\r\nevicted_keys:0\r\nkeyspace_hits:{}\r\n\
                 keyspace_misses:{}\r\ntotal_error_replies:{}\r\nrejected_oom_writes:{}\r\n",
                st.total_connections_received,
                st.total_commands_processed,
                st.total_net_input_bytes,
                st.total_net_output_bytes,
                st.keyspace_hits,
                st.keyspace_misses,
                st.total_error_replies,
                st.rejected_oom
            );
        }
        "keyspace" => {
            out.push_str("# Keyspace\r\n");
            if !s.is_empty() {
                let _ = write!(out, "db0:keys={},expires=0,avg_ttl=0\r\n", s.len());
            }
        }
        "latency" => {
            out.push_str("# Latency\r\n");
            let _ = s.probe.write_info(out, ctx.clock.ticks_per_us());
        }
        _ => {}
    }
}

/// INFO [section ...]: "default", "all" and "everything" mean every section.
pub fn info(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let mut wanted = [args.len() == 1; SECTIONS.len()];
    for a in args.iter().skip(1) {
        if a.eq_ignore_ascii_case(b"all")
            || a.eq_ignore_ascii_case(b"default")
            || a.eq_ignore_ascii_case(b"everything")
        {
            wanted = [true; SECTIONS.len()];
        }
        for (i, s) in SECTIONS.iter().enumerate() {
            if a.eq_ignore_ascii_case(s.as_bytes()) {
                wanted[i] = true;
            }
        }
    }
    let mut out = String::new();
    for (i, s) in SECTIONS.iter().enumerate() {
        if wanted[i] {
            if !out.is_empty() {
                out.push_str("\r\n");
            }
            write_section(ctx, s, &mut out);
        }
    }
    ctx.reply.bulk(out.as_bytes());
}

// ---- PROBE -----------------------------------------------------------------

/// PROBE RESET: clears the latency probe (custom to snapvm).
fn probe_reset(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.store.probe.reset();
    ctx.reply.ok();
}

pub static PROBE_SUBS: &[Spec] = &[spec(
    "probe|reset",
    2,
    &["fast"],
    NOKEY,
    &["@slow"],
    probe_reset,
)];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::commands::test_util::{cmd, new_store};

    fn bulk_text(out: &[u8]) -> String {
        let body_start = out.iter().position(|&c| c == b'\n').unwrap() + 1;
        String::from_utf8(out[body_start..out.len() - 2].to_vec()).unwrap()
    }

    #[test]
    fn info_sections() {
        let mut s = new_store();
        let out = cmd!(s, "INFO", "keyspace");
        assert_eq!(out, b"$12\r\n# Keyspace\r\n\r\n");
        cmd!(s, "SET", "a", "1");
        cmd!(s, "SET", "b", "1");
        assert_eq!(
            bulk_text(&cmd!(s, "INFO", "KEYSPACE")),
            "# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\n"
        );
        let all = bulk_text(&cmd!(s, "INFO"));
        assert!(all.starts_with("# Server\r\nredis_version:7.0.0\r\n"));
        for h in [
            "\r\n\r\n# Clients\r\n",
            "\r\n\r\n# Memory\r\nused_memory:",
            "# Stats\r\n",
            "# Latency\r\n",
        ] {
            assert!(all.contains(h), "{h}");
        }
        assert!(all.contains("total_commands_processed:5\r\n"), "{all}");
        assert!(all.contains("maxmemory_policy:noeviction\r\n"));
        assert_eq!(cmd!(s, "INFO", "nosuch"), b"$0\r\n\r\n");
        let two = bulk_text(&cmd!(s, "INFO", "clients", "stats"));
        assert!(two.starts_with("# Clients\r\n") && two.contains("\r\n\r\n# Stats\r\n"));
    }

    #[test]
    fn info_latency_and_reset() {
        let mut s = new_store();
        s.probe.record_cmd(5000);
        s.probe.record_loop_gap(100_000);
        let text = bulk_text(&cmd!(s, "INFO", "latency"));
        assert!(
            text.starts_with("# Latency\r\nprobe_max_loop_gap_us:100.000\r\n"),
            "{text}"
        );
        assert!(text.contains("probe_cmd_count:1\r\n"));
        assert!(text.contains("probe_cmd_max_us:5.000\r\n"));
        for k in [
            "probe_cmd_p50_us:",
            "probe_cmd_p99_us:",
            "probe_cmd_p999_us:",
        ] {
            assert!(text.contains(k));
        }
        assert_eq!(cmd!(s, "PROBE", "RESET"), b"+OK\r\n");
        assert!(bulk_text(&cmd!(s, "INFO", "latency")).contains("probe_cmd_count:0\r\n"));
        s.probe.record_cmd(1);
        assert_eq!(cmd!(s, "CONFIG", "RESETSTAT"), b"+OK\r\n");
        assert_eq!(s.probe.commands().count(), 0);
        assert_eq!(s.stats.total_commands_processed, 0);
        assert_eq!(
            cmd!(s, "PROBE", "x"),
            b"-ERR unknown subcommand 'x'. Try PROBE HELP.\r\n"
        );
    }

    #[test]
    fn human_sizes() {
        let mut h = String::new();
        human(&mut h, 1000);
        h.push(' ');
        human(&mut h, 1024 * 1024 * 3 / 2);
        h.push(' ');
        human(&mut h, 1 << 30);
        assert_eq!(h, "1000B 1.50M 1.00G");
    }
}
