"""``python -m MODULE ARGS`` as a command whose SIGINT raises KeyboardInterrupt, as
Ctrl-C in a terminal does, even where the tests run as a background job: a
shell starts those ignoring SIGINT, their children inherit that, and Python
(like ``stop_signals``) keeps an inherited ignored SIGINT ignored."""

import sys

_RUN = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def command(module: str, *args) -> list:
    return [sys.executable, "-c", _RUN, module, *map(str, args)]
