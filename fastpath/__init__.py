"""Hot paths of the gateway: each compiled module has a pure-Python twin.

``NO_EXTENSIONS`` is read here, once: ``MESHGATE_NO_EXTENSIONS=1`` makes every
selector module use its pure-Python twin even when the compiled one is built.
"""

import os


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    return value not in ("", "0", "false", "no", "off")


NO_EXTENSIONS: bool = _env_flag("MESHGATE_NO_EXTENSIONS")
