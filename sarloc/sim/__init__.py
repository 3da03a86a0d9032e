"""Simulation for tests and benchmarks (generated scenes, simulated flights, an ArduPilot SITL harness).

Nothing in the onboard runtime imports this package.
"""
