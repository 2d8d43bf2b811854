"""`python -m services.execution`: run the execution service's API process."""

from services.execution import ExecutionService
from services.runtime import main

if __name__ == "__main__":
    main(ExecutionService())
