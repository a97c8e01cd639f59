"""The whole system as users and attackers meet it: processes, crashes, bad input, layout."""
