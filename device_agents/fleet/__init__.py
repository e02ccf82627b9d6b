"""The fleet simulator: many device agents with their own streams against one real server."""
