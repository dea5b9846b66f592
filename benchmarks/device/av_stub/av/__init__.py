"""Stand-in for PyAV on the device run only (benchmarks/device/run.sh installs it where `import av` fails).

ComfyUI imports PyAV at start-up for its video and audio types; the benchmark never touches
video, so the GPU machine (no internet: it gets only what prepare.sh puts in the carried folder)
is spared the 36 MB PyAV wheel. Every name resolves to a class that refuses to be used, so a
video call says so instead of misbehaving.
"""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed here (benchmark stand-in): ComfyUI video/audio nodes cannot run.")


def open(*args, **kwargs):  # noqa: A001 (PyAV's name)
    _Unavailable()


time_base = 1_000_000


def __getattr__(name):
    return type(name, (_Unavailable,), {})
