"""Simulation for tests, benchmarks and the demo: generated scenes, simulated flights, test senders, synthetic map
packs and an ArduPilot SITL harness.

Rule: may import :mod:`sarloc.core`, :mod:`sarloc.backends`, :mod:`sarloc.mappack` and :mod:`sarloc.runtime`; the
lab (eval, trainer, export, calib, the demo and the CLI) may import it; the product never does.

* :mod:`~sarloc.sim.scenes`: generated co-registered SAR / optical scenes (``sarloc synth``).
* :mod:`~sarloc.sim.flight`: a simulated flight over a scene: SAR strips and their truth (``sarloc simulate``).
* :mod:`~sarloc.sim.senders`: UDP / TCP strip senders (the other end of the daemon's stream sources).
* :mod:`~sarloc.sim.packs`: synthetic map packs of any size (search benchmarks and tests).
* :mod:`~sarloc.sim.placement`: a scene without geo-reference placed at a chosen lon/lat (a UTM grid).
* :mod:`~sarloc.sim.sitl`, :mod:`~sarloc.sim.telemetry`, :mod:`~sarloc.sim.live_strips`,
  :mod:`~sarloc.sim.closed_loop`, :mod:`~sarloc.sim.closed_loop_analysis`: ArduPilot SITL closed loops (the
  simulator, its telemetry, SAR strips cut live along the true trajectory, the flight and its analysis).
"""
