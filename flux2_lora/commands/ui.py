"""`flux2-lora ui`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError


def ui(
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    auth: str | None = None,
    auth_file: str | None = None,
    root: list[str] | None = None,
    state_dir: str | None = None,
) -> None:
    """The web app: Dataset, Training, Evaluation and Optimization tabs.

    Args:
        host: Address to listen on (loopback by default).
        port: Port.
        share: Also open a public Gradio share link (needs --auth); a bare --share means true.
        auth: USER:PASSWORD required to open the app.
        auth_file: File of USER:PASSWORD lines.
        root: Folders the app may read and write (default: .).
        state_dir: Where jobs and pictures are recorded (default: ~/.cache/flux2-lora/ui).
    """
    from ..ui.app import is_loopback, read_auth, serve
    from ..ui.paths import Roots, UiError

    pairs = read_auth(auth, auth_file)
    public = share or not is_loopback(host)
    if public and not pairs:
        raise UsageError(
            f"--host {host}{' --share' if share else ''}: anyone who can reach the app could read and write your "
            "folders; add --auth USER:PASSWORD (or --auth-file F), or keep the default --host 127.0.0.1"
        )
    try:
        roots = Roots.of(root or [os.getcwd()])
    except UiError as e:
        raise UsageError(str(e)) from None
    state = Path(state_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flux2-lora" / "ui")
    serve(roots, state, host, port, share, pairs)
