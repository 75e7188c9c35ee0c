"""What every service process shares: flags, logging, metrics, the run loop."""
