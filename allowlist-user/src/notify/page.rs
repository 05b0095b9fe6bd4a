//! The small pages behind action links. Every value is escaped (key names
//! are the owner's free text); the pages load nothing from elsewhere.

use crate::store::ActionRecord;

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn frame(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\">\
         <title>{t} · allowlist</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;color:#111}}\
         dt{{font-weight:600}}dd{{margin:0 0 .5rem 0}}button{{font:inherit;padding:.5rem 1rem;background:#0b57d0;color:#fff;border:0;border-radius:4px;cursor:pointer}}\
         code{{background:#eee;padding:.1rem .3rem;word-break:break-all}}</style></head>\
         <body><main><h1>{t}</h1>{body}</main></body></html>\n",
        t = esc(title)
    )
}

fn facts(rec: &ActionRecord) -> String {
    let mut out = format!("<dl><dt>Account</dt><dd>{}</dd>", esc(&rec.account));
    if !rec.addr.is_empty() {
        out += &format!("<dt>Address</dt><dd>{}</dd>", esc(&rec.addr));
    }
    if !rec.key_id.is_empty() {
        out += &format!(
            "<dt>Key</dt><dd>{} ({})</dd>",
            esc(&rec.key_name),
            esc(&rec.key_id)
        );
    }
    out + "</dl>"
}

/// GET of a live link: what it does (`what`, the button's words), and the
/// one form that does it.
pub fn confirm(rec: &ActionRecord, what: &str) -> String {
    frame(
        what,
        &format!(
            "{}<p>This changes the account's policy at once. Nothing happens until you confirm.</p>\
             <form method=\"post\"><input type=\"hidden\" name=\"nonce\" value=\"{}\">\
             <button type=\"submit\">{}</button></form>",
            facts(rec),
            esc(&rec.nonce),
            esc(what)
        ),
    )
}

pub fn done(rec: &ActionRecord, what: &str, secret: Option<&str>) -> String {
    let mut body = format!(
        "{}<p>Done. The other links of this notification no longer work.</p>",
        facts(rec)
    );
    if let Some(s) = secret {
        body += &format!(
            "<p>The key's new secret, shown this once (the old one has stopped working):</p>\
             <p><code>{}</code></p>",
            esc(s)
        );
    }
    frame(&format!("{what}: done"), &body)
}

pub fn used(rec: &ActionRecord) -> String {
    frame(
        "This link was used",
        &format!(
            "{}<p>An action of this notification was already taken; each notification acts once. \
             The account's lists show the current state (<code>allowlistctl ips list</code>).</p>",
            facts(rec)
        ),
    )
}

pub fn expired(rec: &ActionRecord) -> String {
    frame(
        "This link has expired",
        &format!(
            "{}<p>Action links work for a limited time. Use <code>allowlistctl ips unauthorized</code> \
             or the console to act on the address.</p>",
            facts(rec)
        ),
    )
}

pub fn unknown() -> String {
    frame(
        "Unknown link",
        "<p>This action link is not valid. Check that the whole link was copied.</p>",
    )
}

pub fn bad_nonce() -> String {
    frame(
        "Confirm on the link's page",
        "<p>This request did not come from the link's confirmation page. Open the link again and confirm there.</p>",
    )
}

pub fn method_not_allowed() -> String {
    frame(
        "Method not allowed",
        "<p>Open the link in a browser (GET) and confirm with the button (POST).</p>",
    )
}

pub fn failed(why: &str) -> String {
    frame(
        "Not done",
        &format!(
            "<p>{}</p><p>Nothing was changed; the link still works.</p>",
            esc(why)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_text_is_escaped() {
        let rec = ActionRecord {
            hash: [0; 32],
            id: "i".into(),
            group: "g".into(),
            account: "acme".into(),
            action: "authorize".into(),
            addr: "192.0.2.1".into(),
            key_id: "k1".into(),
            key_name: "<script>alert(1)</script>\"".into(),
            nonce: "n\"><x".into(),
            created_at: 0,
            expires_at: 1,
            used_at: None,
            used_by: None,
        };
        let html = confirm(&rec, "Authorize 192.0.2.1");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("value=\"n&quot;&gt;&lt;x\""));
    }
}
