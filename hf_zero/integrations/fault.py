"""A lost rank under ``hf-zero launch`` / the bootstrap: name it, then let torchrun restart the
group, which resumes from the last complete checkpoint.

[Note: naming the lost rank]
When a rank dies, its sockets close and a survivor's next gloo / NCCL call raises a generic
error ("Connection closed by peer [10.0.0.2]:38401") or, on a silent network loss, times out
after the process group's timeout. Neither names the rank. So every rank of the bootstrap
publishes ``(host, pid)`` and a heartbeat counter in the process group's own store from a
daemon thread (torchrun's agent hosts that store by default; with a store per restart
attempt, which ``hf-zero launch --max-restarts`` asks for, rank 0's process does, so a store
that stops answering names rank 0),
and a survivor whose collective fails (or that the launcher stops with SIGTERM, which
torchrun sends the rest of the group once one worker died) looks: a peer on this host is
lost when its process is gone (``/proc``), a peer elsewhere when its heartbeat stopped over
``STALE_AFTER`` seconds. The error (:class:`LostRankError`) names it. Nothing here runs in a
collective: it cannot change training results.

[Note: resuming after a restart]
torchrun restarts the whole group (``--max-restarts``) with ``TORCHELASTIC_RESTART_COUNT``
> 0. The bootstrap's Trainer then resumes, when the script did not ask for a checkpoint
itself, from the newest *complete* ``checkpoint-N`` in ``output_dir``: ``trainer_state.json``
readable (the Trainer writes it last) and, for an hf_zero checkpoint, ``hf_zero/latest``
naming an existing tag (the engine writes it after every rank's shards). The engine's own
resume loads it at any world size.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:   # torch is imported lazily here: the bootstrap loads this module first
    import torch.distributed

BEAT_SECONDS = 0.5
STALE_AFTER = 3 * BEAT_SECONDS
_PREFIX = "hf_zero_liveness"


class LostRankError(RuntimeError):
    """A peer rank died (or stopped answering): raised on the survivors, naming it."""


class _Liveness:
    def __init__(self) -> None:
        self.store: Optional["torch.distributed.Store"] = None   # this attempt's PrefixStore once the group is up
        self.rank = 0
        self.world = 1
        self.roster: dict[int, tuple[str, int]] = {}
        self.stopping = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def run(self) -> None:
        """Daemon thread: wait for the script's process group, publish this rank, then beat."""
        import torch.distributed as dist

        while not (dist.is_available() and dist.is_initialized()):
            if self.stopping.wait(0.2):
                return
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"{_PREFIX}/{restart}", _get_default_store())
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            store.set(f"who/{self.rank}", json.dumps([socket.gethostname(), os.getpid()]))
            self.store = store
            everyone = [f"who/{rank}" for rank in range(self.world)]
            while not self.stopping.is_set():
                store.add(f"beat/{self.rank}", 1)
                if len(self.roster) < self.world and store.check(everyone):   # kept: usable if the store goes
                    self.roster = {rank: (host, int(pid)) for rank, (host, pid) in
                                   enumerate(json.loads(value) for value in store.multi_get(everyone))}
                self.stopping.wait(BEAT_SECONDS)
        except Exception:   # the store is gone (launcher stopping): nothing left to report to
            return

    def _refresh_roster(self) -> None:
        """The ranks published so far (a failure soon after start can come before the beat
        thread has read them all)."""
        assert self.store is not None, "called only once the store is up"
        for rank in range(self.world):
            if rank not in self.roster and self.store.check([f"who/{rank}"]):
                host, pid = json.loads(self.store.get(f"who/{rank}"))
                self.roster[rank] = (host, int(pid))

    def _beats(self, ranks: list[int]) -> dict[int, int]:
        assert self.store is not None, "called only once the store is up"
        return {rank: self.store.add(f"beat/{rank}", 0) for rank in ranks}

    def lost_ranks(self, wait: bool = True) -> list[str]:
        """Descriptions of the peers that are gone; [] when none can be shown to be. Waits up to
        ``STALE_AFTER``: a killed process closes its sockets a moment before /proc shows it
        exited, and a remote heartbeat needs that long to be seen missing. If the store stops
        answering, rank 0 (whose launcher or process hosts it) is named unless seen alive.
        ``wait=False`` (on SIGTERM, sent to all the survivors at once): this host's peers only,
        looked at once, so that survivors exiting together are not named."""
        if self.store is None:
            return []
        try:
            self._refresh_roster()
        except Exception:   # the store is gone: what was read before is all there is
            pass
        if not wait:
            here = socket.gethostname()
            return [f"rank {rank} (pid {pid} on {host}, exited)" for rank, (host, pid) in self.roster.items()
                    if rank != self.rank and host == here and not _process_alive(pid)]
        here = socket.gethostname()
        peers = {rank: who for rank in range(self.world) if rank != self.rank and (who := self.roster.get(rank))}
        local = {rank: who for rank, who in peers.items() if who[0] == here}
        remote = sorted(set(peers) - set(local))
        try:
            before = self._beats(remote)
        except Exception:
            before = None
        deadline = time.monotonic() + STALE_AFTER
        while True:
            lost = [f"rank {rank} (pid {pid} on {host}, exited)" for rank, (host, pid) in local.items()
                    if not _process_alive(pid)]
            if lost or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        try:
            after = self._beats(remote) if before is not None else None
        except Exception:
            after = None
        if after is None or before is None:
            if 0 in remote or (self.rank != 0 and 0 not in peers):
                lost.append("rank 0 (the process group's store, hosted with it, stopped answering)")
            return lost
        return lost + [f"rank {rank} (on {peers[rank][0]}, no heartbeat for {STALE_AFTER:g} s)"
                       for rank in remote if after[rank] == before[rank]]


_LIVENESS = _Liveness()


def _process_alive(pid: int) -> bool:
    """False for a missing process or a zombie (a SIGKILLed rank its launcher has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def lost_rank_message(cause: str, wait: bool = True) -> Optional[str]:
    lost = _bounded(lambda: _LIVENESS.lost_ranks(wait), STALE_AFTER + 2.0) or []
    if not lost:
        return None
    return (f"hf_zero: rank {_LIVENESS.rank} of {_LIVENESS.world}: lost peer {', '.join(lost)}; {cause}. With "
            f"--max-restarts the launcher restarts the group and the Trainer resumes from the last complete "
            f"checkpoint (docs/multinode.md)")


def _bounded(function, seconds: float):
    """``function()``, or None if it has not returned after ``seconds`` (a store call to a host
    that vanished without closing its connection can block for the store's whole timeout)."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(function()), daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None


def warn_shared_store_restarts() -> None:
    """torchrun run directly with ``--max-restarts`` and its default shared store: a restarted
    group may read the previous attempt's addresses (multinode.py's ``launcher_env``)."""
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("RANK") == "0"
            and restart_count() == 0):
        sys.stderr.write("hf_zero: torchrun --max-restarts with its shared rendezvous store: a restarted group can "
                         "read the previous attempt's addresses and fail to connect (pytorch/pytorch#135712); set "
                         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (hf-zero launch does)\n")


def install() -> None:
    """Start the heartbeat and name a lost peer when the launcher stops this rank (SIGTERM)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    warn_shared_store_restarts()
    _LIVENESS.thread = threading.Thread(target=_LIVENESS.run, name="hf_zero-liveness", daemon=True)
    _LIVENESS.thread.start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def stop() -> None:
    """End the heartbeat before the process group and the interpreter go, so that no thread of
    ours is inside a store call during teardown (torch's own shutdown can already abort with
    SIGABRT when threads are left running: bootstrap.py's ``_destroy_process_group``)."""
    _LIVENESS.stopping.set()
    if _LIVENESS.thread is not None:
        _LIVENESS.thread.join(timeout=5.0)


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the launcher may repeat it: finish this line first
    message = lost_rank_message("stopped by the launcher (SIGTERM)", wait=False)
    if message:
        os.write(2, (message + "\n").encode())   # not sys.stderr: the main thread may be inside its write
    os._exit(128 + signum)   # as the default action would: no cleanup that could wait on the dead peer


def reraise_naming_lost_rank(err: BaseException) -> None:
    """Called with the script's exception: a communication failure caused by a dead peer is
    raised again as :class:`LostRankError` naming it; anything else returns (re-raise it)."""
    if not isinstance(err, RuntimeError) or isinstance(err, LostRankError):
        return
    message = lost_rank_message(f"this rank's collective failed: {str(err).splitlines()[0] if str(err) else err!r}")
    if message:
        raise LostRankError(message) from err


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written to the end (note above)."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))),
                   reverse=True)
    for _, name in found:
        path = os.path.join(output_dir, name)
        if _complete(path):
            return path
    return None


def _complete(path: str) -> bool:
    try:
        with open(os.path.join(path, "trainer_state.json")) as state:
            json.load(state)
    except (OSError, ValueError):
        return False
    engine_dir = os.path.join(path, "hf_zero")
    if not os.path.isdir(engine_dir):
        return True
    latest = os.path.join(engine_dir, "latest")
    if not os.path.isfile(latest):
        return False
    with open(latest) as tag:
        return os.path.isdir(os.path.join(engine_dir, tag.read().strip()))


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class ResumeAfterRestartMixin:
    """``train()`` resumes from the last complete checkpoint after a torchrun restart when the
    script passed no ``resume_from_checkpoint`` (note above)."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):   # noqa: ANN001, ANN002, ANN003
        if restart_count() > 0 and resume_from_checkpoint in (None, False):
            found = last_complete_checkpoint(self.args.output_dir)
            if found is not None:
                sys.stderr.write(f"hf_zero: restart {restart_count()}: resuming from {found}\n")
                resume_from_checkpoint = found
        return super().train(resume_from_checkpoint, *args, **kwargs)
