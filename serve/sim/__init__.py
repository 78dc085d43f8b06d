"""Serving simulator and deployment planner: profile the engine, estimate step times, simulate, plan."""
