//! Installation-wide settings that a configuration reload (SIGHUP)
//! changes while the daemon runs. They live in the policy snapshot, so the
//! edge and the kernel switch over in the same step as for any change:
//! kernel maps first, then the snapshot swap.

use std::sync::Arc;

use ipnet::IpNet;

use crate::daemon::{Daemon, DaemonError};

impl Daemon {
    /// Replaces `[proxy] trusted_proxies`: whose PROXY header and
    /// X-Forwarded-For the edge believes, and which balancers the XDP
    /// guard always admits. On a kernel failure nothing changes.
    pub async fn set_trusted_proxies(&self, nets: Vec<IpNet>) -> Result<(), DaemonError> {
        let _guard = self.changes.lock().await;
        let old = self.policy.load_full();
        let snap = old.with_trusted(nets);
        if let Err(e) = self.sync_policy_kernel(&snap) {
            if let Err(k) = self.sync_policy_kernel(&old) {
                tracing::error!(error = %k, "restoring the kernel maps after a failed reload");
            }
            return Err(e);
        }
        self.policy.store(Arc::new(snap));
        Ok(())
    }
}
