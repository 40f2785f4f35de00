"""`python -m retina.stats`: runs retina.data.stats (its --help says what it does)."""
from retina.data.stats import main

if __name__ == '__main__':
    main()
