"""`python -m services.control`: the control plane (the launcher starts it)."""

from services.control.plane import main

main()
