"""PBB task domains: instructions, their inputs and real execution. Importing this registers them all."""

from pbbjax.data.tasks import arithmetic, ciphers, grammars, leetcode  # noqa: F401
