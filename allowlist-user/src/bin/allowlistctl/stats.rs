//! `allowlistctl stats`

use allowlist::api::{Events, Stats};

use crate::{
    Output,
    client::{Client, CtlError},
};

pub async fn run(client: &Client) -> Result<Output, CtlError> {
    let s: Stats = client.get("/v1/stats").await?;
    let mut text = String::new();
    text.push_str(&format!(
        "API guard ({}): {} — {}\n",
        s.api_guard.mode,
        if s.api_guard.armed {
            "armed"
        } else {
            "not armed"
        },
        s.api_guard.reason
    ));
    let st = &s.store;
    text.push_str(&format!(
        "store ({}): {}, {} refusals waiting, {} not kept{}\n",
        st.backend,
        match st.down_since_ms {
            _ if st.reachable => "reachable".to_string(),
            Some(ms) => format!(
                "UNREACHABLE since {} (enforcing the last policy known; admin changes are refused)",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
                )
            ),
            None => "UNREACHABLE".to_string(),
        },
        st.queued_refusals,
        st.queue_dropped,
        match st.last_resync_ms {
            Some(ms) => format!(
                ", last resync {}",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
                )
            ),
            None => String::new(),
        }
    ));
    text.push_str(&format!(
        "unauthorized list: {} entries evicted by the cap, {} refusals not recorded (too many sources at once)\n",
        s.unauthorized_evicted, s.refusals_dropped
    ));
    if let Some(k) = &s.kernel {
        text.push_str("kernel (XDP edge_filter)\n");
        if s.interfaces.is_empty() {
            text.push_str("  attached to: no interface ([kernel] interfaces is empty)\n");
        }
        for (i, m) in &s.interfaces {
            text.push_str(&format!("  attached to: {i} ({m})\n"));
        }
        text.push_str(&format!("  passed                {}\n", k.passed));
        for (reason, n) in &k.dropped {
            text.push_str(&format!("  {:<21} {n}\n", format!("dropped ({reason})")));
        }
        text.push_str(&format!(
            "  guard dropped (api)   {}\n",
            k.guard_dropped_api
        ));
        text.push_str(&format!(
            "  guard dropped (smtp)  {}\n",
            k.guard_dropped_smtp
        ));
        text.push_str(&format!(
            "  guard dropped (unclassifiable fragments, IPv6 chains)  {}\n",
            k.guard_dropped_unclassified
        ));
        text.push_str(&format!(
            "  events sent {} / rate-limited {} / lost {}; received by the daemon {}\n",
            k.events_sent, k.events_rate_limited, k.events_lost, s.events_received
        ));
        if let Some(m) = &s.maps {
            text.push_str(&format!(
                "  maps: drop list {}/{} prefixes, guard {} v4 + {} v6 of {} each\n",
                m.drop_rules, m.drop_capacity, m.guard_v4, m.guard_v6, m.guard_capacity
            ));
        }
    } else {
        text.push_str("kernel enforcement is off (allowlistd runs with --no-kernel or [kernel] enabled = false)\n");
    }
    text.push_str(&format!("drop list entries: {}\n", s.drop_entries));
    Output::new(&s, text)
}

pub async fn events(client: &Client) -> Result<Output, CtlError> {
    let e: Events = client.get("/v1/events").await?;
    let mut text = String::new();
    for ev in &e.events {
        text.push_str(&format!(
            "{:.3}  {:<39} {:<9} {:<7} port {} proto {}\n",
            ev.at, ev.source, ev.verdict, ev.reason, ev.port, ev.protocol
        ));
    }
    if e.events.is_empty() {
        text.push_str("no kernel drop events since the daemon started\n");
    }
    Output::new(&e, text)
}
