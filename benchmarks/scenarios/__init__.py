"""The scenarios, each a function of the run's Bench and its own ScenarioResult."""
