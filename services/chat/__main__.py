"""`python -m services.chat`: run the chat service."""

from services.chat import ChatService
from services.runtime import main

if __name__ == "__main__":
    main(ChatService())
