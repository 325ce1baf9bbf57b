"""Suites that exercise the product as its users run it: :mod:`~nativemem.testing.reliability` drives real
``nativemem serve`` processes (durability under SIGKILL, isolation, load, fuzzing, damaged files, stalls,
poisoned memories, concurrency) for ``nativemem reliability``; :mod:`~nativemem.testing.poison` is the poisoning
set it and the relevance benchmark store. Nothing here is imported by the library or the server; the fuzzing
part needs the test extra (``hypothesis``) when it runs."""
