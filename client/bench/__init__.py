"""``broker-bench``: a load generator that verifies what it measures.

The pure parts (no I/O, no event loop) are unit-tested on their own:

- :mod:`client.bench.wire`: request frames out, broker frames in (replies matched by ``replyTo``,
  so typed replies of our node and untyped ones of the original package both work);
- :mod:`client.bench.sequence`: per-channel loss, duplicate and reorder accounting;
- :mod:`client.bench.histogram`: mergeable latency histograms and their percentiles;
- :mod:`client.bench.pacing`: the token bucket that paces a fixed total rate per loop tick;
- :mod:`client.bench.results`: one worker's counts, merged across processes into a report;
- :mod:`client.bench.procfs`: CPU time and resident memory of a process from ``/proc``.

The shells move bytes: :mod:`client.bench.connection` drives websockets' Sans-I/O
``ClientProtocol`` from an ``asyncio.Protocol``; :mod:`client.bench.load` runs the pairs of one
generator process; :mod:`client.bench.coordinator` runs one or several generator processes and
samples the broker's CPU over the measured window; :mod:`client.bench.cli` is the click CLI.
"""
