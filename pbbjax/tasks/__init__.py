"""PBB task domains: instructions, their inputs and real execution. Importing this registers them all."""

import importlib

for _module in ("arithmetic", "leetcode", "ciphers", "grammars"):
    try:
        importlib.import_module(f"pbbjax.tasks.{_module}")
    except ModuleNotFoundError as e:  # a domain module not written yet
        if e.name != f"pbbjax.tasks.{_module}":
            raise
