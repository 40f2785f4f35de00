"""`python -m retina.release`: runs retina.publish.release (its --help says what it does)."""
from retina.publish.release import main

if __name__ == '__main__':
    main()
