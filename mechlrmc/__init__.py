"""mechlrmc core."""
