"""The OnTrack dashboard (Plotly Dash). Built in a later issue; reads the store only
through its data-access layer and never computes statistics."""
