"""Dashboard pages: layout and callbacks only (data via dashboard.data)."""
