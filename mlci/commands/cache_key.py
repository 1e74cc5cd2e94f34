"""`mlci cache-key`: where a target's tuning cache lives and the Actions cache keys that carry it between runs.

Actions cache entries are immutable, so each run saves under a new key (the action appends the run id)
and restores the newest entry by prefix: same target, hardware, TVM and config first, then any config
(kernels are keyed by workload inside the cache, so an edited config still reuses every unchanged kernel).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mlci.config import Config

KEY_VERSION = "v1"


@dataclass(frozen=True)
class CachePlan:
    path: str
    """The target's tuning cache directory (what actions/cache saves)."""
    key: str
    """Key prefix for this run; the action appends the run id and attempt."""
    restore_keys: list[str]

    def outputs(self) -> dict[str, str]:
        return {"path": self.path, "key": self.key, "restore-keys": "\n".join(self.restore_keys)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def cache_plan(config: Config, target_name: str | None) -> CachePlan:
    """Resolve the target on this runner (its fingerprint decides which cached schedules are valid)."""
    from mlci.targets import environment_fingerprint, select_target
    from mlci.tuning import cache_directory, cache_key

    target = select_target(config, target_name)
    fingerprint = environment_fingerprint(target)
    hardware = cache_key(fingerprint)
    config_digest = hashlib.sha256(config.path.read_bytes()).hexdigest()[:12]
    family = f"mlci-tuning-{KEY_VERSION}-{_slug(target.name)}-tvm{_slug(str(fingerprint.tvm))}-{hardware}-"
    return CachePlan(
        path=str(cache_directory(config.cache_dir, target.name, fingerprint).resolve()),
        key=f"{family}{config_digest}-",
        restore_keys=[f"{family}{config_digest}-", family],
    )
